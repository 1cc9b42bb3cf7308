"""Data-parallel replicas and the router that spreads requests over them (round robin, least loaded, SLO)."""
