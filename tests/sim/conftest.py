"""Shared simulator fixtures: a profile with known coefficients, and a real --quick profile of a tiny model."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sloserve.engine.cost_model import FitError, FittedModel, LinearCostModel
from sloserve.engine.features import OVERHEAD_TERMS, ExecuteFeatures, token_knots
from sloserve.sim.profile import Profile

# Seconds per unit of each term: 0.2 ms per sampled row, 20 ns per prefill token pair, ...
KNOWN_ATTENTION = dict(samples=2e-4, requests=3e-5, prefill_chunks=4e-4, prefill_attn=2e-8, prefill_ctx_attn=4e-8,
                       prefill_ctx=1e-6, decode_ctx=1e-7, decode_padded=5e-8, decode_masked=3e-8, step=3e-3)
KNOWN_OVERHEAD = dict(step=3e-4, requests=2e-5, samples=1e-5)


def known_execute(knots: tuple[int, ...]) -> dict[str, float]:
    """A 3 ms step; each kernel that runs reads the weights once (2 ms), plus 50 us a prompt token and 75 us a decode
    position (the row-streaming kernel against a GEMM), and a 3 ms jump from 4 tokens on (a BLAS regime change)."""
    table = {f"prefill_tokens@{k}": 2e-3 + 5e-5 * k + (3e-3 if k >= 4 else 0.0) for k in knots}
    table |= {f"decode_tokens@{k}": 2e-3 + 7.5e-5 * k + (3e-3 if k >= 4 else 0.0) for k in knots}
    return table | KNOWN_ATTENTION


def known_profile(vocab_size: int = 384, num_kv_blocks: int = 256, max_model_len: int = 256) -> Profile:
    nothing = FitError(0, 0.0, 0.0, 0.0)
    features = ExecuteFeatures(token_knots(64))
    truth = known_execute(features.knots)
    return Profile(
        machine={"cpu": "synthetic"}, model={"path": "synthetic"},
        engine={"block_size": 16, "max_num_batched_tokens": 64, "max_num_seqs": 8, "kv_bytes_per_block": 1024,
                "num_kv_blocks": num_kv_blocks, "max_model_len": max_model_len, "vocab_size": vocab_size},
        token_knots=features.knots,
        execute=FittedModel(LinearCostModel(features.terms, [truth[t] for t in features.terms]), nothing, nothing, 5),
        overhead=FittedModel(LinearCostModel(OVERHEAD_TERMS, [KNOWN_OVERHEAD[t] for t in OVERHEAD_TERMS]), nothing, nothing, 5),
    )


@pytest.fixture
def synthetic_profile() -> Profile:
    return known_profile()


@pytest.fixture(scope="session")
def tiny_profile(tiny_model_dir, tmp_path_factory):
    """`sloserve profile --quick` on the tiny SmolLM-shaped model (one repeat: tests check form, not speed)."""
    from sloserve.cli import app

    path = tmp_path_factory.mktemp("profile") / "profile.json"
    result = CliRunner().invoke(app, [
        "profile", str(tiny_model_dir("smollm")), "--quick", "--repeats", "1", "--max-num-batched-tokens", "64",
        "--max-num-seqs", "8", "--num-kv-blocks", "64", "-o", str(path),
    ])
    assert result.exit_code == 0, result.output
    return path, result.output
