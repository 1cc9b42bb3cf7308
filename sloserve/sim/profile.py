"""The profile file: where it was measured, the model and engine settings, raw timings, the fitted step-time model."""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field

from sloserve.engine.cost import StepCostModel
from sloserve.engine.cost_model import FittedModel
from sloserve.engine.features import OVERHEAD_TERMS, ExecuteFeatures, StepShape

SCHEMA = "sloserve.sim.profile"
VERSION = 1


@dataclass(slots=True)
class Timing:
    """One measured step: its shape and seconds (median over repeats for grid shapes)."""

    shape: StepShape
    seconds: float
    source: str  # "grid" (constructed plan) or "engine" (a real engine run)

    def to_dict(self) -> dict:
        return {"shape": self.shape.to_dict(), "seconds": self.seconds, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> Timing:
        return cls(StepShape.from_dict(d["shape"]), d["seconds"], d["source"])


@dataclass(slots=True)
class Profile:
    machine: dict  # cpu, cores, torch version and threads, device
    model: dict  # path, shape, dtype, load format
    engine: dict  # block_size, max_num_batched_tokens, max_num_seqs, kv_bytes_per_block, num_kv_blocks, max_model_len, vocab_size
    token_knots: tuple[int, ...]  # token counts of the execute model's piecewise-linear table
    execute: FittedModel  # ModelExecutor.execute(plan)
    overhead: FittedModel  # LLMEngine.step() minus execute: the engine's own work per step
    settings: dict = field(default_factory=dict)  # grid, repeats, warm-ups
    execute_timings: list[Timing] = field(default_factory=list)
    overhead_timings: list[Timing] = field(default_factory=list)
    created_unix: float = 0.0
    # Seconds a step spends ranking each waiting request, per policy (sim/rank_cost.py); {} in older profiles
    # and in harvested ones (their measured steps already include the ranking of the queues they saw).
    rank_seconds_per_waiting: dict[str, float] = field(default_factory=dict)
    step_model: StepCostModel = field(init=False, repr=False, compare=False)  # the two fits as one predictor

    def __post_init__(self) -> None:
        execute_terms = ExecuteFeatures(tuple(self.token_knots)).terms
        for name, fitted, terms in (("execute", self.execute, execute_terms), ("overhead", self.overhead, OVERHEAD_TERMS)):
            if tuple(fitted.model.terms) != terms:
                raise ValueError(f"the profile's {name} terms {list(fitted.model.terms)} are not this version's {list(terms)}")
        self.step_model = StepCostModel(tuple(self.token_knots),
                                        self.execute.model.coefficients + self.overhead.model.coefficients)

    def step_seconds(self, shape: StepShape) -> float:
        return self.step_model.step_seconds(shape)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "version": VERSION, "created_unix": self.created_unix,
            "machine": self.machine, "model": self.model, "engine": self.engine, "settings": self.settings,
            "fit": {"token_knots": list(self.token_knots), "execute": self.execute.to_dict(),
                    "overhead": self.overhead.to_dict(), "rank_seconds_per_waiting": self.rank_seconds_per_waiting},
            "timings": {"execute": [t.to_dict() for t in self.execute_timings],
                        "overhead": [t.to_dict() for t in self.overhead_timings]},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        if d.get("schema") != SCHEMA or d.get("version") != VERSION:
            raise ValueError(f"not a sloserve profile of version {VERSION} (schema={d.get('schema')!r})")
        fit = d["fit"]
        return cls(
            machine=d["machine"], model=d["model"], engine=d["engine"], token_knots=tuple(fit["token_knots"]),
            execute=FittedModel.from_dict(fit["execute"]), overhead=FittedModel.from_dict(fit["overhead"]),
            settings=d.get("settings", {}),
            execute_timings=[Timing.from_dict(t) for t in d["timings"]["execute"]],
            overhead_timings=[Timing.from_dict(t) for t in d["timings"]["overhead"]],
            created_unix=d.get("created_unix", 0.0),
            rank_seconds_per_waiting=dict(fit.get("rank_seconds_per_waiting", {})),
        )

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=False)

    @classmethod
    def load(cls, path: str) -> Profile:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def describe_machine(device: str = "cpu") -> dict:
    import torch

    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": device,
        # Other work on the machine while profiling skews every timing: keep the evidence.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
