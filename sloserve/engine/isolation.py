"""Failure isolation: a step that raises is retried without the request that caused it (found by bisection, or as
the one the policy cannot rank)."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TypeVar

from sloserve.engine.policy import Policy
from sloserve.engine.scheduler import SchedulerOutput
from sloserve.request import Request

logger = logging.getLogger(__name__)

Sampled = TypeVar("Sampled")


@dataclasses.dataclass(slots=True)
class IsolatedStep:
    """What survived a step: the plan's requests that ran, their outputs, and those that failed alone."""

    plan: SchedulerOutput  # `scheduled` holds only the survivors, in their original order
    sampled: list
    failed: list  # (scheduled entry, the exception it raised when run alone)


def execute_isolating(execute: Callable[[SchedulerOutput], list[Sampled]], plan: SchedulerOutput) -> IsolatedStep:
    """Run the plan; if it raises, bisect it until each failing request is alone, and run the rest.

    A request that fails on its own is the cause; halves that succeed are its innocent neighbours,
    and their outputs stand. Re-running a half recomputes the same KV entries, so the retry is
    harmless to the cache. A fault that needs the whole batch to show (memory, say) disappears
    once halved, and then every request survives. The cost, O(k log n) extra executions for k
    culprits, is paid only when a step fails.
    """
    try:
        return IsolatedStep(plan, execute(plan), [])
    except Exception as error:  # noqa: BLE001 - any fault is someone's; find whose
        if len(plan.scheduled) == 1:
            return IsolatedStep(dataclasses.replace(plan, scheduled=[]), [], [(plan.scheduled[0], error)])
        logger.warning("a step of %d requests failed (%r); bisecting to find the cause", len(plan.scheduled), error)
    mid = len(plan.scheduled) // 2
    halves = [execute_isolating(execute, dataclasses.replace(plan, scheduled=part))
              for part in (plan.scheduled[:mid], plan.scheduled[mid:])]
    return IsolatedStep(
        dataclasses.replace(plan, scheduled=halves[0].plan.scheduled + halves[1].plan.scheduled),
        halves[0].sampled + halves[1].sampled,
        halves[0].failed + halves[1].failed,
    )


def unrankable(policy: Policy, requests: list[Request]) -> list[Request]:
    """The requests the policy raises on when ranking them alone: when planning a step raises, these are the cause."""
    failed = []
    for request in requests:
        try:
            policy.rank(request)
        except Exception:  # noqa: BLE001 - any fault in its ranking is this request's
            failed.append(request)
    return failed
