"""The simulator: the engine with its model swapped for a fitted step-time model on a virtual clock."""
