"""Speculative decoding on virtual time: the engine's real Speculation (adaptive k, budget rule, rollback) over a
proposer whose drafts cost the draft's profiled step time, and verifications accepted by a seeded draw."""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from sloserve.engine.cost import StepCostModel, StepTimeModel
from sloserve.engine.cost_model import FittedModel
from sloserve.engine.features import OVERHEAD_TERMS
from sloserve.engine.scheduler import SchedulerOutput
from sloserve.sim.clock import VirtualClock
from sloserve.sim.executor import SimulatedExecutor
from sloserve.spec.config import SpeculativeConfig
from sloserve.spec.draft_cost import draft_model_seconds, ngram_seconds
from sloserve.spec.proposer import DraftRequest
from sloserve.spec.speculation import Speculation

NGRAM_SECONDS_PER_TOKEN = 2e-7  # the n-gram proposer's own starting estimate, when no profile measured it

DraftCost = Callable[[list[int], list[int]], float]  # (ks, contexts) -> seconds


@dataclass(slots=True)
class SpeculationProfile:
    """What `sloserve profile --speculative-config` measured beside the target's step-time model."""

    config: dict  # the speculative config it ran with
    per_token_acceptance: float | None  # P(a draft is accepted | the ones before it were): the simulator's draw
    acceptance_rate: float | None  # vLLM's: accepted / drafted tokens
    mean_accepted_length: float | None  # tokens per verification, the target's own included
    draft_scale: float = 1.0  # measured proposal time / the draft fit's prediction, over the profile's engine run
    # Of the requests asked for drafts, the share that got any: an n-gram lookup often finds no match.
    proposal_rate: float = 1.0
    ngram_seconds_per_token: float | None = None
    draft_model: dict | None = None  # path, shape, dtype of the draft (method draft_model)
    draft_token_knots: tuple[int, ...] | None = None
    draft_execute: FittedModel | None = None  # the draft's forward pass, fitted like the target's execute

    def draft_step_model(self) -> StepCostModel | None:
        """The draft's step time: its execute fit, and no engine overhead (a proposal has no step loop)."""
        if self.draft_execute is None:
            return None
        return StepCostModel(tuple(self.draft_token_knots), self.draft_execute.model.coefficients + [0.0] * len(OVERHEAD_TERMS))

    def to_dict(self) -> dict:
        return {
            "config": self.config, "per_token_acceptance": self.per_token_acceptance,
            "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length,
            "draft_scale": self.draft_scale, "proposal_rate": self.proposal_rate, "ngram_seconds_per_token": self.ngram_seconds_per_token,
            "draft_model": self.draft_model,
            "draft_token_knots": list(self.draft_token_knots) if self.draft_token_knots else None,
            "draft_execute": self.draft_execute.to_dict() if self.draft_execute else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SpeculationProfile:
        return cls(
            d["config"], d.get("per_token_acceptance"), d.get("acceptance_rate"), d.get("mean_accepted_length"),
            d.get("draft_scale", 1.0), d.get("proposal_rate", 1.0), d.get("ngram_seconds_per_token"), d.get("draft_model"),
            tuple(d["draft_token_knots"]) if d.get("draft_token_knots") else None,
            FittedModel.from_dict(d["draft_execute"]) if d.get("draft_execute") else None,
        )


class SimulatedProposer:
    """Drafts k placeholder tokens per request (a request gets none with probability 1 - proposal_rate, as when
    an n-gram lookup finds no match) and moves the virtual clock by what drafting would cost.

    It predicts with the draft's fit alone and charges the fit times the profiled scale (batch building,
    sampling): the real engine's Speculation learns that ratio from its clock, and here it does the same.
    """

    def __init__(self, clock: VirtualClock, cost: DraftCost, scale: float, proposal_rate: float = 1.0, seed: int = 0,
                 token_id: int = 0) -> None:
        self.clock, self.cost, self.scale, self.token_id = clock, cost, scale, token_id
        self.proposal_rate = proposal_rate
        self.rng = random.Random(seed)
        self.draft_probs: dict = {}  # verification is a draw, not a comparison of distributions
        self.busy_seconds = 0.0

    def propose(self, batch: list[DraftRequest]) -> list[list[int]]:
        seconds = self.scale * self.cost([r.k for r in batch], [len(r.token_ids) for r in batch])
        self.clock.advance(seconds)
        self.busy_seconds += seconds
        return [[self.token_id] * r.k if self.proposal_rate >= 1.0 or self.rng.random() < self.proposal_rate else []
                for r in batch]

    def predict_seconds(self, ks: list[int], contexts: list[int]) -> float:
        return self.cost(ks, contexts)

    def forget(self, request_ids: list[str]) -> None:
        pass  # keeps no per-request state


class SpeculativeSimulatedExecutor(SimulatedExecutor):
    """A verification accepts each draft with probability `acceptance` until the first rejection (the geometric
    model adaptive k assumes), then emits the target's own token; the step costs the verify shape's time."""

    def __init__(self, model: StepTimeModel, clock: VirtualClock, num_kv_blocks: int, acceptance: float, seed: int,
                 seconds_per_waiting: float = 0.0) -> None:
        super().__init__(model, clock, num_kv_blocks, seconds_per_waiting=seconds_per_waiting)
        self.acceptance = acceptance
        self.rng = random.Random(seed)  # seeded: a simulation repeats exactly

    def execute(self, plan: SchedulerOutput) -> list[list[int]]:
        sampled = super().execute(plan)
        for s, tokens in zip(plan.scheduled, sampled):
            if s.spec_token_ids and tokens:
                accepted = 0
                while accepted < len(s.spec_token_ids) and self.rng.random() < self.acceptance:
                    accepted += 1
                tokens[:0] = s.spec_token_ids[:accepted]
        return sampled


@dataclass(slots=True)
class SimSpeculation:
    """Everything a simulated engine needs to speculate: the config, the acceptance it draws from, the draft's cost."""

    config: SpeculativeConfig
    acceptance: float
    draft_cost: DraftCost
    draft_scale: float = 1.0
    proposal_rate: float = 1.0
    seed: int = 0

    def executor(self, model: StepTimeModel, clock: VirtualClock, num_kv_blocks: int,
                 seconds_per_waiting: float = 0.0) -> SpeculativeSimulatedExecutor:
        return SpeculativeSimulatedExecutor(model, clock, num_kv_blocks, self.acceptance, self.seed, seconds_per_waiting)

    def speculator(self, clock: VirtualClock, max_model_len: int) -> Speculation:
        proposer = SimulatedProposer(clock, self.draft_cost, self.draft_scale, self.proposal_rate, self.seed + 1)
        return Speculation(self.config, proposer, max_model_len, clock=clock)


def sim_speculation(config: SpeculativeConfig, profiled: SpeculationProfile | None, acceptance: float | None,
                    seed: int = 0) -> SimSpeculation:
    """The simulated speculation for `config`: acceptance given, else the profile's; the draft's cost from the profile."""
    if acceptance is None:
        acceptance = profiled.per_token_acceptance if profiled else None
        if acceptance is None:
            raise ValueError("no acceptance rate to simulate speculation with: profile with --speculative-config "
                             "(and a draft that verifies at least once) or pass --spec-acceptance")
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"--spec-acceptance must lie in [0, 1], got {acceptance}")
    if profiled is not None and profiled.config.get("method") != config.method:
        raise ValueError(f"the profile measured speculation with method {profiled.config.get('method')!r}, "
                         f"not {config.method!r}: profile again with this --speculative-config")
    rate = profiled.proposal_rate if profiled else 1.0
    if config.method == "ngram":
        per_token = (profiled.ngram_seconds_per_token if profiled else None) or NGRAM_SECONDS_PER_TOKEN
        return SimSpeculation(config, acceptance, lambda ks, cs: ngram_seconds(per_token, ks, cs), 1.0, rate, seed)
    step = profiled.draft_step_model() if profiled else None
    if step is None:
        raise ValueError("simulating method 'draft_model' needs the draft's step time: profile with "
                         "--speculative-config naming the draft model")
    return SimSpeculation(config, acceptance, lambda ks, cs: draft_model_seconds(step, ks, cs), profiled.draft_scale,
                          rate, seed)
