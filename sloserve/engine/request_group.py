"""Parallel sampling (n > 1): one request fanned out into n sibling requests that prefill the prompt once."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from sloserve.request import CompletionOutput, Request, RequestOutput, SamplingParams

_UINT64 = 2**64
_INT64_MIN = -(2**63)


def child_id(request_id: str, index: int) -> str:
    """A sibling's engine-side id (vLLM's `f"{index}_{request_id}"`), so each has its own sampler stream."""
    return f"{index}_{request_id}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sibling `index` samples alone (n = 1), seeded `seed + index` when a seed is given (wrapped to int64)."""
    seed = params.seed
    if seed is not None:
        seed = (seed + index - _INT64_MIN) % _UINT64 + _INT64_MIN
    return dataclasses.replace(params, n=1, seed=seed)


@dataclass(slots=True, eq=False)
class RequestGroup:
    """The n siblings of one request, reported together under the parent's id.

    Only the leader (sibling 0) is scheduled at first; the others are held until its prompt is
    computed, so they find the prompt's full blocks in the prefix cache instead of each computing
    them in the same step (blocks become findable only after the step that writes them).
    """

    request_id: str
    children: list[Request]
    held: list[Request] = field(default_factory=list)  # siblings not yet handed to the scheduler

    @property
    def leader(self) -> Request:
        return self.children[0]

    def ready_to_release(self, prefix_caching: bool) -> bool:
        """Whether the held siblings may be scheduled now: the prompt is in the cache, or never will be."""
        leader = self.leader
        return bool(self.held) and (not prefix_caching or leader.finished
                                    or leader.num_computed_tokens >= leader.num_prompt_tokens)

    @property
    def finished(self) -> bool:
        return all(child.finished for child in self.children)

    def output(self) -> RequestOutput:
        """The group's state in vLLM's shape: one RequestOutput whose `outputs` hold the n siblings by index."""
        finished = self.finished
        return dataclasses.replace(  # the prompt's side (ids, arrival, prompt logprobs) is the leader's
            RequestOutput.of(self.leader),
            request_id=self.request_id,
            outputs=[CompletionOutput.of(c, i) for i, c in enumerate(self.children)],
            finished=finished,
            finished_time=max(c.finished_time or 0.0 for c in self.children) if finished else None,
            num_preemptions=sum(c.num_preemptions for c in self.children),
        )


def output_of(item: Request | RequestGroup) -> RequestOutput:
    """The current RequestOutput of a plain request or of a group of siblings."""
    return item.output() if isinstance(item, RequestGroup) else RequestOutput.of(item)


class RequestGroups:
    """The engine's unfinished groups, by the parent's id and by each sibling's id."""

    def __init__(self) -> None:
        self._by_parent: dict[str, RequestGroup] = {}
        self._by_child: dict[str, RequestGroup] = {}

    def __bool__(self) -> bool:
        return bool(self._by_parent)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_parent or request_id in self._by_child

    def add(self, group: RequestGroup) -> None:
        self._by_parent[group.request_id] = group
        self._by_child.update((c.request_id, group) for c in group.children)

    def pop(self, request_id: str) -> RequestGroup | None:
        """Forget the group of parent id `request_id` (its held siblings are never scheduled)."""
        group = self._by_parent.pop(request_id, None)
        if group is not None:
            group.held.clear()
            for child in group.children:
                self._by_child.pop(child.request_id, None)
        return group

    @property
    def has_held(self) -> bool:
        return any(g.held for g in self._by_parent.values())

    def release(self, schedule: Callable[[Request], None], prefix_caching: bool) -> None:
        """Hand held siblings to the scheduler once their leader's prompt blocks are in the prefix cache."""
        for group in self._by_parent.values():
            if group.ready_to_release(prefix_caching):
                for child in group.held:
                    schedule(child)
                group.held.clear()

    def report(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Siblings' outputs folded into one output per group (the parent's id, all n completions)."""
        reported, touched = [], {}
        for out in outputs:
            group = self._by_child.get(out.request_id)
            if group is None:
                reported.append(out)
            else:
                touched[group.request_id] = group
        for group in touched.values():
            merged = group.output()
            reported.append(merged)
            if merged.finished:
                self.pop(group.request_id)
        return reported
