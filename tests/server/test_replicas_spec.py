"""Spec-decode counters behind the router: two speculating replicas on a local Ray, their counters summed on /metrics.

A module of its own: its Ray holds the CPUs of these two replicas only (test_replicas.py's keep theirs all module).
"""
from __future__ import annotations

import httpx

from serverkit import MODEL_NAME, LiveServer, metric, parse_metrics, wait_until
from sloserve.router.launch import ReplicaSettings, start_replicas, stop_replicas

GOOD = {"model": MODEL_NAME, "prompt": "Shall I compare thee", "max_tokens": 12, "ignore_eos": True, "temperature": 0}


def test_spec_decode_counters_of_the_replicas_reach_metrics(local_ray, chat_model_dir):
    made = []

    def replicas(config):
        made.append(start_replicas(config, ReplicaSettings(2, "round_robin", num_threads=1)))
        return made[-1]

    spec = {"method": "draft_model", "num_speculative_tokens": 2, "model": str(chat_model_dir)}
    server = LiveServer(chat_model_dir, replicas=replicas,
                        engine_kwargs={"use_kernels": False, "speculative_config": spec})
    try:
        for _ in range(2):  # one request on each replica
            assert httpx.post(server.url + "/v1/completions", json=GOOD, timeout=60).status_code == 200

        def drafts() -> float:
            return metric(parse_metrics(httpx.get(server.url + "/metrics").text), "sloserve:spec_decode_num_drafts_total")

        assert wait_until(lambda: drafts() > 0, timeout=10, interval=0.05)
        router_reports = [load.spec_decode for load in server.ctx.engine.router.loads.values()]
        assert all(r is not None and r.num_drafts > 0 for r in router_reports)  # both replicas drafted
        assert wait_until(lambda: drafts() == sum(r.num_drafts for r in
                                                  (load.spec_decode for load in server.ctx.engine.router.loads.values())),
                          timeout=10, interval=0.05)
    finally:
        server.stop()
        stop_replicas(made[0])
