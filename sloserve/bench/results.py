"""The results file: a versioned JSON dict of config, environment and raw per-request records."""
# Written by `sloserve bench` and (later) by the simulator, read by `bench report`.
# Summaries are never stored: they are recomputed from the records, so a
# report can re-judge a run against another SLO or other percentiles.
from __future__ import annotations

import json
import os
import platform
import socket
import sys
from dataclasses import dataclass, field
from importlib import metadata

from sloserve.bench.records import RequestRecord

SCHEMA = "sloserve.bench.results"
VERSION = 1


@dataclass(slots=True)
class Run:
    """One load level: how requests arrived, and every request's record."""

    label: str
    arrivals: dict  # Arrivals.to_dict(): {"kind", "rate" (float or "inf"), "burstiness"}
    max_concurrency: int | None
    num_warmups: int
    started_unix: float  # wall clock at t=0 (simulator: 0.0)
    duration_s: float  # t=0 to the end of the last request
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return float(self.arrivals["rate"])

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "arrivals": self.arrivals,
            "max_concurrency": self.max_concurrency,
            "num_warmups": self.num_warmups,
            "started_unix": self.started_unix,
            "duration_s": self.duration_s,
            "records": [r.to_dict() for r in self.records],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Run:
        return cls(
            label=d["label"],
            arrivals=d["arrivals"],
            max_concurrency=d["max_concurrency"],
            num_warmups=d["num_warmups"],
            started_unix=d["started_unix"],
            duration_s=d["duration_s"],
            records=[RequestRecord.from_dict(r) for r in d["records"]],
        )


@dataclass(slots=True)
class BenchResults:
    config: dict  # {"workload", "client", "slo", "percentiles", "sweep", "tokenizer", "command"}
    environment: dict
    runs: list[Run]
    sweep: dict | None = None  # {"target_attainment", "max_goodput_rate", "probes": [{"rate", "attainment", "run"}]}
    source: str = "client"  # "client" (measured over HTTP) or "simulator"
    created_unix: float = 0.0

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "source": self.source,
            "created_unix": self.created_unix,
            "config": self.config,
            "environment": self.environment,
            "runs": [r.to_dict() for r in self.runs],
            "sweep": self.sweep,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BenchResults:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a sloserve bench results file (schema={d.get('schema')!r})")
        if d.get("version") != VERSION:
            raise ValueError(f"results version {d.get('version')} is not supported (this reader: {VERSION})")
        return cls(
            config=d["config"],
            environment=d["environment"],
            runs=[Run.from_dict(r) for r in d["runs"]],
            sweep=d.get("sweep"),
            source=d.get("source", "client"),
            created_unix=d.get("created_unix", 0.0),
        )

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, allow_nan=False)

    @classmethod
    def load(cls, path: str) -> BenchResults:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def capture_environment() -> dict:
    """Where the numbers came from: enough to tell two runs' machines apart."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "sloserve": _version("sloserve"),
        "httpx": _version("httpx"),
        "numpy": _version("numpy"),
    }


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None
