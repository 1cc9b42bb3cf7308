"""Scheduling policies: the order in which waiting requests are admitted and running ones are kept.

A policy ranks requests; the scheduler admits in rank order and preempts the worst-ranked running
request when the KV cache cannot grow. New policies plug in here without touching the scheduler.
"""
from __future__ import annotations

from typing import Protocol

from sloserve.request import Request


class Policy(Protocol):
    def rank(self, request: Request) -> tuple:
        """Sort key: smaller ranks are served first and preempted last."""
        ...


class FCFS:
    """First come, first served: the latest arrival is the first preempted."""

    def rank(self, request: Request) -> tuple:
        return (request.arrival_time,)


class PriorityPolicy:
    """Lower `priority` value first (vLLM's convention), then arrival order."""

    def rank(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time)


POLICIES = {"fcfs": FCFS, "priority": PriorityPolicy}
