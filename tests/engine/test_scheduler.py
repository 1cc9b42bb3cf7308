"""Scheduler: token budget, decode-first, chunked prefill, preemption order, admission limits."""
from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.policy import FCFS, PriorityPolicy
from sloserve.engine.scheduler import Scheduler, SchedulerConfig
from sloserve.request import Request, RequestStatus, SamplingParams


def make_request(rid: str, prompt_len: int, arrival: float, priority: int = 0) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=100), arrival, priority)


def config(budget: int, seqs: int = 8, block_size: int = 16) -> SchedulerConfig:
    return SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, block_size=block_size)


def run_plan(scheduler: Scheduler, plan) -> None:
    """Apply a plan as the engine would: every sampling request gets token 7."""
    scheduler.update_from_output(plan, [[7] if s.samples else [] for s in plan.scheduled])


def test_long_prompt_is_chunked_while_decodes_keep_flowing():
    scheduler = Scheduler(BlockManager(100, 16), FCFS(), config(32, 8))
    short = make_request("short", 4, 0.0)
    scheduler.add(short)
    run_plan(scheduler, scheduler.schedule())
    long = make_request("long", 100, 1.0)
    scheduler.add(long)
    steps = []
    while not long.output_token_ids:  # until the prompt is done and its first token sampled
        plan = scheduler.schedule()
        steps.append({s.request_id: s.num_new_tokens for s in plan.scheduled})
        assert plan.num_batched_tokens <= 32
        run_plan(scheduler, plan)
    # The decode is served first every step; the prompt takes what is left of the budget.
    assert steps == [{"short": 1, "long": 31}, {"short": 1, "long": 31}, {"short": 1, "long": 31}, {"short": 1, "long": 7}]


def test_preemption_takes_the_worst_ranked_and_recomputes_it_later():
    blocks = BlockManager(4, 4)  # 16 token slots
    scheduler = Scheduler(blocks, FCFS(), config(64, 8))
    first, second = make_request("first", 8, 0.0), make_request("second", 8, 1.0)
    scheduler.add(first)
    scheduler.add(second)
    run_plan(scheduler, scheduler.schedule())  # both prefilled: 2 blocks each, all 4 used
    plan = scheduler.schedule()  # first needs a third block: the later arrival is preempted
    assert plan.preempted_request_ids == ["second"]
    assert [s.request_id for s in plan.scheduled] == ["first"]
    assert second.status is RequestStatus.PREEMPTED and second.num_computed_tokens == 0
    assert scheduler.waiting == [second] and blocks.num_free_blocks == 1
    scheduler.finish(first, RequestStatus.FINISHED_LENGTH)
    plan = scheduler.schedule()  # second comes back and recomputes prompt and output together
    assert [(s.request_id, s.num_new_tokens) for s in plan.scheduled] == [("second", 9)]


def test_priority_policy_admits_and_protects_urgent_requests():
    scheduler = Scheduler(BlockManager(100, 16), PriorityPolicy(), config(10, 8))
    scheduler.add(make_request("batch-job", 10, 0.0, priority=5))
    scheduler.add(make_request("interactive", 10, 1.0, priority=0))
    plan = scheduler.schedule()
    assert [s.request_id for s in plan.scheduled] == ["interactive"]


def test_max_num_seqs_bounds_the_running_set():
    scheduler = Scheduler(BlockManager(100, 16), FCFS(), config(1000, 2))
    for i in range(5):
        scheduler.add(make_request(str(i), 3, float(i)))
    plan = scheduler.schedule()
    assert [s.request_id for s in plan.scheduled] == ["0", "1"]
    assert len(scheduler.waiting) == 3


def test_finishing_frees_every_block():
    blocks = BlockManager(10, 4)
    scheduler = Scheduler(blocks, FCFS(), config(100, 8))
    requests = [make_request(str(i), 9, float(i)) for i in range(3)]
    for r in requests:
        scheduler.add(r)
    run_plan(scheduler, scheduler.schedule())
    assert blocks.num_free_blocks == 1
    for r in requests:
        scheduler.finish(r, RequestStatus.FINISHED_ABORTED)
    assert blocks.num_free_blocks == 10 and not scheduler.has_unfinished()


def test_the_plan_is_plain_data_and_the_scheduler_applies_the_output():
    scheduler = Scheduler(BlockManager(100, 4), FCFS(), config(6, block_size=4))
    request = make_request("r", 10, 0.0)
    scheduler.add(request)
    plan = scheduler.schedule()
    (s,) = plan.scheduled
    assert (s.request_id, s.token_ids, s.num_computed_tokens, s.num_new_tokens, s.samples) == ("r", [1, 2, 3, 4, 5, 6], 0, 6, False)
    assert s.block_table == [0, 1] and s.sampling_params is request.sampling_params
    assert scheduler.update_from_output(plan, [[]]) == []  # mid-prefill: nothing sampled
    assert request.num_computed_tokens == 6 and not request.output_token_ids
    plan = scheduler.schedule()
    (s,) = plan.scheduled
    assert (s.token_ids, s.num_computed_tokens, s.samples, s.block_table) == ([7, 8, 9, 10], 6, True, [0, 1, 2])
    assert scheduler.update_from_output(plan, [[42]]) == [(request, [42])]
    assert request.num_computed_tokens == 10 and request.output_token_ids == [42]
    (s,) = scheduler.schedule().scheduled  # the decode computes the sampled token at position 10
    assert (s.token_ids, s.num_computed_tokens, s.num_new_tokens) == ([42], 10, 1)


def test_an_output_for_a_request_that_ended_mid_step_is_dropped():
    scheduler = Scheduler(BlockManager(100, 16), FCFS(), config(32))
    request = make_request("r", 4, 0.0)
    scheduler.add(request)
    plan = scheduler.schedule()
    scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
    assert scheduler.update_from_output(plan, [[9]]) == [] and not request.output_token_ids
