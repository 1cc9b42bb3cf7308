"""The simulator models prefix-cache hits: distinct prompts get distinct ids, shared prefixes shared ones."""
import dataclasses

from conftest import known_profile

from sloserve.bench.metrics import request_metrics
from sloserve.bench.workload import RequestSpec
from sloserve.sim.clock import VirtualClock
from sloserve.sim.simulate import EngineKnobs, build_sim_engine, prompt_token_ids, simulate

KNOBS = EngineKnobs(max_num_batched_tokens=256, max_num_seqs=8, num_kv_blocks=256, max_model_len=1024, block_size=16,
                    vocab_size=384)


def test_text_prompts_get_ids_that_share_exactly_the_shared_words():
    system = " ".join(f"w{i}" for i in range(40))
    a = prompt_token_ids(RequestSpec(0, system + " what is up", 43, 4, 0.0), 384)
    b = prompt_token_ids(RequestSpec(1, system + " how are you", 43, 4, 0.0), 384)
    c = prompt_token_ids(RequestSpec(2, "something else entirely here", 43, 4, 0.0), 384)
    assert len(a) == len(b) == 43 and a[:40] == b[:40] and a[40:] != b[40:]
    assert a[:40] != c[:40] and len(set(a)) > 30  # not one placeholder id repeated


def _ttfts(caching: bool, specs: list[RequestSpec]):
    clock = VirtualClock()
    engine = build_sim_engine(known_profile().step_model, dataclasses.replace(KNOBS, enable_prefix_caching=caching),
                              "fcfs", clock)
    outcome = simulate(engine, clock, specs)
    return [request_metrics(r).ttft_s for r in outcome.records], engine.block_manager


def test_a_shared_system_prompt_is_computed_once_in_the_simulation():
    system = " ".join(f"rule{i}" for i in range(320))
    specs = [RequestSpec(i, f"{system} question {i} about topic{i}", 324, 4, 1.0 * i) for i in range(4)]
    on, blocks_on = _ttfts(True, specs)
    off, blocks_off = _ttfts(False, specs)
    assert blocks_on.stats.hits == 3 * 320 and blocks_off.stats.hits == 0
    assert on[0] == off[0]  # the first request finds nothing cached
    assert all(a < b / 2 for a, b in zip(on[1:], off[1:]))  # the rest skip 320 of 324 tokens
