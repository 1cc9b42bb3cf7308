"""Prefix caching: content-addressed blocks, hits, eviction order, and reference counts through the scheduler."""
from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.policy import FCFS
from sloserve.engine.scheduler import Scheduler, SchedulerConfig, token_slice
from sloserve.request import Request, RequestStatus, SamplingParams


def fill(blocks: BlockManager, rid: str, tokens: list[int]) -> list[int]:
    """Allocate and compute `tokens` for a request (as a finished step would), sharing any cached prefix."""
    cached = blocks.cached_prefix(tokens)
    assert blocks.allocate_slots(rid, len(tokens), cached)
    blocks.cache_full_blocks(rid, len(tokens), lambda a, b: tokens[a:b])
    return cached


def assert_no_leak(blocks: BlockManager) -> None:
    """Every block is back in the free queue (empty or cached) and nobody holds a reference."""
    assert blocks.num_free_blocks == blocks.num_blocks
    assert all(b.ref_count == 0 for b in blocks.blocks)
    assert blocks.block_tables == {}


def test_a_repeated_prefix_hits_its_full_blocks_only():
    blocks = BlockManager(16, 4)
    first = list(range(10, 20))  # 2 full blocks + a 2-token tail
    fill(blocks, "a", first)
    assert blocks.num_cached_blocks == 2  # the partial tail block is not cached
    hit = blocks.cached_prefix(first[:8] + [99, 98, 97])
    assert hit == blocks.block_tables["a"][:2]
    # The same 8 tokens as a whole prompt: the last token must be computed, so only 1 block is reused.
    assert blocks.cached_prefix(first[:8]) == blocks.block_tables["a"][:1]
    # A different first block breaks the chain even when the second block's tokens match.
    assert blocks.cached_prefix([0, 0, 0, 0] + first[4:]) == []


def test_shared_blocks_are_reference_counted_and_freed_into_the_cache():
    blocks = BlockManager(8, 4)
    prompt = list(range(1, 13))
    fill(blocks, "a", prompt)
    shared = fill(blocks, "b", prompt + [50])
    assert shared == blocks.block_tables["a"]  # all 3 of a's blocks (12 tokens < 13)
    assert [blocks.blocks[i].ref_count for i in shared] == [2, 2, 2]
    assert blocks.num_used_blocks == 4  # 3 shared + b's own tail block
    blocks.free("a")
    assert [blocks.blocks[i].ref_count for i in shared] == [1, 1, 1]
    assert blocks.cached_prefix(prompt + [7]) == shared  # still cached while b holds them
    blocks.free("b")
    assert_no_leak(blocks)
    assert blocks.cached_prefix(prompt + [7]) == shared  # freed, yet still cached


def test_eviction_takes_empty_blocks_first_then_least_recently_freed():
    blocks = BlockManager(6, 2)
    fill(blocks, "old", [1, 2, 3, 4])
    blocks.free("old")
    fill(blocks, "new", [5, 6, 7, 8])
    blocks.free("new")
    assert blocks.num_cached_blocks == 4
    # Two fresh blocks are still empty: they are used before any cached content is evicted.
    assert blocks.allocate_slots("x", 4)
    assert blocks.num_cached_blocks == 4
    blocks.free("x")
    # Now room for 3 blocks: the 2 empty ones, then the oldest freed (the tail of "old" goes before its head).
    assert blocks.allocate_slots("y", 6)
    assert blocks.cached_prefix([1, 2, 3, 4, 0]) == blocks.cached_prefix([1, 2, 0])  # "old"'s tail is gone
    assert len(blocks.cached_prefix([1, 2, 0])) == 1
    assert len(blocks.cached_prefix([5, 6, 7, 8, 0])) == 2  # the more recent prefix is intact
    blocks.free("y")
    assert_no_leak(blocks)


def test_a_hit_is_checked_against_the_tokens_not_only_the_hash():
    blocks = BlockManager(4, 2)
    fill(blocks, "a", [1, 2, 3])
    (key,) = [b.key for b in blocks.blocks if b.key is not None]
    # A block whose parent hash matches but whose tokens differ is no hit.
    assert key[1] == (1, 2) and blocks.cached_prefix([1, 3, 3]) == []


def test_allocation_failure_changes_nothing_and_never_evicts_the_hit_blocks():
    blocks = BlockManager(3, 2)
    fill(blocks, "a", [1, 2, 3, 4])
    blocks.free("a")
    cached = blocks.cached_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(cached) == 2
    # 9 tokens need 5 blocks; only 1 is not the hit's: refuse without touching anything.
    assert not blocks.allocate_slots("b", 9, cached)
    assert "b" not in blocks.block_tables and blocks.num_free_blocks == 3
    assert blocks.allocate_slots("b", 6, cached)  # 2 shared + 1 new: fits, and the hit survives
    assert blocks.block_tables["b"][:2] == cached
    blocks.free("b")
    assert_no_leak(blocks)


def test_caching_off_never_shares():
    blocks = BlockManager(8, 2, enable_prefix_caching=False)
    fill(blocks, "a", [1, 2, 3, 4, 5])
    assert blocks.cached_prefix([1, 2, 3, 4, 5]) == [] and blocks.num_cached_blocks == 0
    blocks.free("a")
    assert_no_leak(blocks)


# -- through the scheduler ----------------------------------------------------------------------

def request(rid: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), 0.0)


def run(scheduler: Scheduler, plan) -> None:
    scheduler.update_from_output(plan, [[7] if s.samples else [] for s in plan.scheduled])


def drain(scheduler: Scheduler) -> None:
    """Step until every request produced max_tokens, finishing them as the engine would."""
    while scheduler.has_unfinished():
        run(scheduler, scheduler.schedule())
        for r in list(scheduler.running):
            if len(r.output_token_ids) >= r.sampling_params.max_tokens:
                scheduler.finish(r, RequestStatus.FINISHED_LENGTH)


def test_a_request_with_a_cached_prefix_starts_after_it_and_chunks_the_rest():
    blocks = BlockManager(64, 4)
    scheduler = Scheduler(blocks, FCFS(), SchedulerConfig(max_num_batched_tokens=8, block_size=4))
    system = list(range(100, 120))  # 5 blocks
    scheduler.add(request("a", system + [1, 2]))
    drain(scheduler)
    second = request("b", system + [3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    scheduler.add(second)
    plan = scheduler.schedule()
    (s,) = plan.scheduled
    assert (s.num_computed_tokens, s.num_new_tokens) == (20, 8)  # 20 cached; the budget cuts the rest
    assert s.token_ids == second.prompt_token_ids[20:28]
    run(scheduler, plan)
    (s,) = scheduler.schedule().scheduled
    assert (s.num_computed_tokens, s.num_new_tokens, s.samples) == (28, 2, True)
    assert blocks.stats.queries == 22 + 30 and blocks.stats.hits == 20


def test_a_fully_cached_prompt_still_computes_its_last_token():
    blocks = BlockManager(64, 4)
    scheduler = Scheduler(blocks, FCFS(), SchedulerConfig(block_size=4))
    prompt = list(range(1, 9))  # exactly 2 blocks
    scheduler.add(request("a", prompt))
    drain(scheduler)
    scheduler.add(request("b", list(prompt)))
    (s,) = scheduler.schedule().scheduled
    # Only the first block is reused: the second holds the last token, whose logits are needed.
    assert (s.num_computed_tokens, s.num_new_tokens, s.samples) == (4, 4, True)


def test_preemption_and_abort_drop_references_but_keep_shared_content():
    blocks = BlockManager(10, 4)
    scheduler = Scheduler(blocks, FCFS(), SchedulerConfig(max_num_batched_tokens=64, block_size=4))
    shared = list(range(1, 17))  # 4 blocks
    first, second = request("first", shared + [20], 12), request("second", shared + [30], 12)
    scheduler.add(first)
    run(scheduler, scheduler.schedule())
    scheduler.add(second)
    run(scheduler, scheduler.schedule())
    table_first = blocks.block_tables["first"]
    assert blocks.block_tables["second"][:4] == table_first[:4]
    assert [blocks.blocks[b].ref_count for b in table_first[:4]] == [2, 2, 2, 2]
    preempted = False
    while not preempted:  # both decode until 10 blocks no longer hold them: the later arrival goes
        plan = scheduler.schedule()
        preempted = plan.preempted_request_ids == ["second"]
        run(scheduler, plan)
    assert second.status is RequestStatus.PREEMPTED
    # first still reads the shared prefix: its blocks were not freed, only second's references dropped.
    assert [blocks.blocks[b].ref_count for b in table_first[:4]] == [1, 1, 1, 1]
    assert blocks.cached_prefix(shared + [0]) == table_first[:4]
    scheduler.finish(first, RequestStatus.FINISHED_ABORTED)  # abort
    plan = scheduler.schedule()  # second comes back and reuses what is still cached
    (s,) = plan.scheduled
    assert s.request_id == "second" and s.num_computed_tokens >= 16
    drain(scheduler)
    assert_no_leak(blocks)


def test_token_slice_feeds_the_cache_with_output_tokens_too():
    blocks = BlockManager(16, 4)
    scheduler = Scheduler(blocks, FCFS(), SchedulerConfig(block_size=4))
    a = request("a", [1, 2, 3], 8)
    scheduler.add(a)
    drain(scheduler)  # prompt + 7 computed outputs: 10 computed tokens, 2 full blocks
    conversation = a.prompt_token_ids + a.output_token_ids
    assert token_slice(a, 0, 11) == conversation
    assert len(blocks.cached_prefix(conversation + [5])) == 2  # a follow-up turn reuses the generated part
