"""Policies on hand-built queues: SLO order and budget shaping, priority preemption without starvation."""
import pytest

from sloserve.engine.engine import LLMEngine
from sloserve.engine.features import StepShape
from sloserve.engine.kv_cache import BlockManager
from sloserve.engine.policy import FCFS, PriorityPolicy, SLOPolicy
from sloserve.engine.scheduler import Scheduler, SchedulerConfig
from sloserve.request import SLO, Request, RequestStatus, SamplingParams

from .fakes import CountingExecutor
from .scripted import LinearSteps, ManualClock

INTERACTIVE, BATCH = SLO(ttft=0.5, tpot=0.05), SLO(ttft=10.0, tpot=0.5)


def request(rid, prompt_len, arrival, slo=None, priority=0, max_tokens=100) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), arrival, priority, slo)


def slo_scheduler(clock, budget=512, seqs=8, blocks=200) -> Scheduler:
    steps = LinearSteps()
    return Scheduler(BlockManager(blocks, 16), SLOPolicy(clock, steps, budget), SchedulerConfig(budget, seqs), steps)


def apply(scheduler, plan, clock=None, dt=0.0):
    """Run a plan as the engine would: time passes, samplers get token 7 stamped with the new time."""
    if clock is not None:
        clock.t += dt
    for r, _ in scheduler.update_from_output(plan, [[7] if s.samples else [] for s in plan.scheduled]):
        r.token_times.append(clock.t if clock else 0.0)


def test_slo_admits_by_least_slack_and_serves_hopeless_requests_last():
    clock = ManualClock(1.0)
    scheduler = slo_scheduler(clock, budget=100, seqs=1)
    # Predicted prefill: 10 ms + 1 ms a token. Slack = arrival + TTFT - now - prefill.
    scheduler.add(request("batch", 20, 0.0, BATCH))  # 10.0 - 1.0 - 0.03 = 8.97 s
    scheduler.add(request("tight", 50, 0.9, INTERACTIVE))  # 1.4 - 1.0 - 0.06 = 0.34 s
    scheduler.add(request("looser", 20, 0.8, SLO(ttft=2.0)))  # 2.8 - 1.0 - 0.03 = 1.77 s
    scheduler.add(request("hopeless", 10, 0.1, INTERACTIVE))  # 0.6 - 1.0 < 0: late whatever happens
    order = []
    while scheduler.waiting:
        plan = scheduler.schedule()
        order.append(plan.scheduled[0].request_id)
        finished = scheduler.running[0]
        apply(scheduler, plan, clock, 0.0)
        scheduler.finish(finished, RequestStatus.FINISHED_LENGTH)  # one seat: the next one comes in
    assert order == ["tight", "looser", "batch", "hopeless"]
    assert scheduler.block_manager.num_free_blocks == 200


def test_slo_cuts_the_prefill_chunk_to_the_tightest_tpot_in_the_batch():
    clock = ManualClock(0.0)
    scheduler = slo_scheduler(clock)
    for rid in ("a", "b"):
        scheduler.add(request(rid, 4, 0.0, INTERACTIVE))
    apply(scheduler, scheduler.schedule(), clock, 0.02)  # both prefilled, first tokens at 20 ms: on time
    scheduler.add(request("long", 300, 0.02, BATCH))
    plan = scheduler.schedule()
    # Decodes first; then 10 ms + (2 + k) ms <= 50 ms (the interactive TPOT) gives k = 38.
    assert [(s.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("b", 1), ("long", 38)]
    # A second prompt finds the step full by the limit: it waits, rather than adding its own 16 tokens.
    apply(scheduler, plan, clock, 0.05)
    scheduler.add(request("long-2", 300, 0.07, BATCH))
    assert [(s.request_id, s.num_new_tokens) for s in scheduler.schedule().scheduled] == [
        ("a", 1), ("b", 1), ("long", 38)]
    # FCFS spends the whole budget on the prompt: a 312 ms step, 6x the interactive TPOT.
    fcfs = Scheduler(BlockManager(200, 16), FCFS(), SchedulerConfig(512, 8), LinearSteps())
    for r in [request("a", 4, 0.0, INTERACTIVE), request("b", 4, 0.0, INTERACTIVE)]:
        fcfs.add(r)
    apply(fcfs, fcfs.schedule())
    fcfs.add(request("long", 300, 0.02, BATCH))
    assert [s.num_new_tokens for s in fcfs.schedule().scheduled] == [1, 1, 300]


def test_a_late_decode_does_not_limit_the_step_but_the_chunk_never_drops_below_the_floor():
    clock = ManualClock(0.0)
    scheduler = slo_scheduler(clock)
    scheduler.add(request("late", 4, 0.0, INTERACTIVE))
    apply(scheduler, scheduler.schedule(), clock, 0.7)  # first token at 0.7 s: TTFT 0.5 s missed
    scheduler.add(request("long", 300, 0.7, BATCH))
    assert [s.num_new_tokens for s in scheduler.schedule().scheduled] == [1, 300]
    tight = slo_scheduler(ManualClock(0.0))
    tight.add(request("tiny-tpot", 4, 0.0, SLO(ttft=0.5, tpot=0.001)))
    apply(tight, tight.schedule(), tight.policy.clock, 0.01)
    tight.add(request("long", 300, 0.01, BATCH))
    assert [s.num_new_tokens for s in tight.schedule().scheduled] == [1, tight.min_chunk]


def test_where_decodes_alone_take_the_tpot_the_limit_yields_to_first_token_deadlines():
    steps = LinearSteps(fixed=0.048, per_token=0.0001)  # four decodes: 48.4 ms, next to the 50 ms TPOT

    def chunk_for(prompt_slo):
        clock = ManualClock(0.0)
        scheduler = Scheduler(BlockManager(200, 16), SLOPolicy(clock, steps, 512), SchedulerConfig(512, 8), steps)
        for rid in "abcd":
            scheduler.add(request(rid, 4, 0.0, INTERACTIVE))
        apply(scheduler, scheduler.schedule(), clock, 0.05)  # first tokens at 50 ms: on time, so their TPOT limits
        scheduler.add(request("long", 300, 0.05, prompt_slo))
        plan = scheduler.schedule()
        assert [s.request_id for s in plan.scheduled] == ["a", "b", "c", "d", "long"]
        return plan.scheduled[-1].num_new_tokens

    # The limit leaves (50 - 48.4) / 0.1 = 16 tokens: 300 tokens at 16 tokens / 50 ms take ~0.95 s. A batch
    # prompt (TTFT 10 s) can afford that, so the decodes keep their TPOT.
    assert chunk_for(BATCH) == 16
    # A 300-token prompt due in 200 ms, in steps that each pay 48.4 ms for the decodes: 300 tokens in
    # 151.6 ms of prompt time, 1.98 tokens/ms. The limit yields as far as that, no further: k / (48.4 + 0.1 k)
    # reaches it at k = 120, and the prompt's first token comes at 2 x 60.4 + 54.4 = 175 ms (16-token chunks:
    # ~0.95 s, late, and every prompt behind it later still).
    assert chunk_for(SLO(ttft=0.2, tpot=0.05)) == 120
    rate = lambda k: k / steps.step_seconds(StepShape([1] * 4 + [k], [4] * 4 + [0], [True] * 4 + [False]))  # noqa: E731
    assert rate(120) >= 300 / (0.2 - 0.0484) > rate(119)


def test_slo_seats_no_more_decodes_than_a_step_with_a_minimum_prefill_chunk_can_carry_within_the_tpot():
    """Every seat adds a decode to every later step: past the batch whose steps (its decodes and the smallest prefill
    chunk) fit the tightest TPOT, a new request waits for a seat to free, though seats and blocks are free."""
    # 10 ms + 1 ms a token: 25 decodes and a 16-token chunk take 51 ms, over the 50 ms TPOT; 24 and 16 take 50.
    def seated(scheduler, clock):
        for i in range(25):
            scheduler.add(request(f"r{i}", 4, 0.0, INTERACTIVE))
        apply(scheduler, scheduler.schedule(), clock, 0.02)  # all prefilled, first tokens at 20 ms: on time
        scheduler.add(request("more", 4, 0.02, INTERACTIVE))
        return [s.request_id for s in scheduler.schedule().scheduled]

    clock = ManualClock(0.0)
    scheduler = slo_scheduler(clock, seqs=64)
    assert seated(scheduler, clock) == [f"r{i}" for i in range(25)]
    assert [r.request_id for r in scheduler.waiting] == ["more"] and len(scheduler.running) == 25
    scheduler.finish(scheduler.running[-1], RequestStatus.FINISHED_LENGTH)  # 24 decodes + 16 tokens: 50 ms
    assert [s.request_id for s in scheduler.schedule().scheduled][-1] == "more"
    # FCFS sets no step time limit: it seats the request at once.
    fcfs_clock = ManualClock(0.0)
    fcfs = Scheduler(BlockManager(200, 16), FCFS(), SchedulerConfig(512, 64), LinearSteps())
    assert seated(fcfs, fcfs_clock)[-1] == "more"


def test_blocked_high_priority_request_preempts_lower_priority_running_ones():
    blocks = BlockManager(4, 4)  # 16 token slots
    scheduler = Scheduler(blocks, PriorityPolicy(), SchedulerConfig(64, 8))
    low_early, low_late = request("low-early", 6, 0.0, priority=5), request("low-late", 6, 1.0, priority=5)
    scheduler.add(low_early)
    scheduler.add(low_late)
    apply(scheduler, scheduler.schedule())  # both running, every block taken
    urgent = request("urgent", 6, 2.0, priority=0)
    scheduler.add(urgent)
    plan = scheduler.schedule()
    # Both decodes fit their 2 blocks; urgent needs 2 more: the worst-ranked low one goes, and its
    # decode already planned this step leaves the plan.
    assert plan.preempted_request_ids == ["low-late"]
    assert [s.request_id for s in plan.scheduled] == ["low-early", "urgent"]
    assert low_late.status is RequestStatus.PREEMPTED and low_late.num_computed_tokens == 0
    # An equal-priority arrival never preempts: no ping-pong between peers.
    assert not scheduler.policy.preempts(request("peer", 4, 3.0, priority=5), low_early)


def test_priority_preemption_does_not_starve_the_preempted_request():
    """Through an engine: the preempted request returns ahead of later low-priority arrivals and completes."""
    engine = LLMEngine(CountingExecutor(num_kv_blocks=6), SchedulerConfig(64, 2, 4, policy="priority"),
                       max_model_len=64, vocab_size=1000, clock=ManualClock(0.0))
    engine.add_request("low-0", list(range(1, 9)), SamplingParams(max_tokens=4), priority=5, arrival_time=0.0)
    engine.add_request("low-1", list(range(1, 9)), SamplingParams(max_tokens=4), priority=5, arrival_time=1.0)
    engine.step()  # both low requests run and hold both seats
    engine.add_request("urgent", list(range(1, 5)), SamplingParams(max_tokens=4), priority=0, arrival_time=2.0)
    engine.add_request("low-2", list(range(1, 5)), SamplingParams(max_tokens=4), priority=5, arrival_time=3.0)
    first_done = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                first_done.append((out.request_id, out.num_preemptions, len(out.outputs[0].token_ids)))
    # urgent took low-1's seat (low-0 was further along and ends first); low-1 resumes before low-2.
    assert [d[0] for d in first_done] == ["low-0", "urgent", "low-1", "low-2"]
    assert dict((rid, p) for rid, p, _ in first_done)["low-1"] == 1  # it was preempted, and still came before low-2
    assert all(n == 4 for *_, n in first_done)
    assert engine.block_manager.num_used_blocks == 0


def test_slo_preempts_a_looser_decode_only_when_it_can_afford_the_pause():
    clock = ManualClock(0.0)
    scheduler = slo_scheduler(clock, seqs=2)
    roomy = request("batch-roomy", 4, 0.0, BATCH, max_tokens=100)  # 99 x 0.5 s of TPOT budget
    busy = request("interactive", 4, 0.0, INTERACTIVE, max_tokens=100)
    for r in (roomy, busy):
        scheduler.add(r)
    for _ in range(3):  # both decoding, both seats taken: three tokens each, 20 ms apart
        apply(scheduler, scheduler.schedule(), clock, 0.02)
    newcomer = request("chat", 8, 0.06, INTERACTIVE)
    scheduler.add(newcomer)
    plan = scheduler.schedule()
    assert plan.preempted_request_ids == ["batch-roomy"]  # not the interactive decode: same TPOT
    assert [s.request_id for s in plan.scheduled] == ["interactive", "chat"]
    # Back in line it ranks by how long it may still pause (not behind later arrivals as such): its last
    # token is due by 0.02 + 99 x 0.5 s; recomputing 7 tokens (17 ms) and its 97 tokens left at its TPOT
    # (48.5 s) leave 0.94 s: what its two tokens 20 ms apart banked against a 0.5 s TPOT.
    policy = scheduler.policy
    assert policy.rank(roomy) == (False, 1, policy.resume_slack(roomy, 0.06), 0.0)
    assert policy.resume_slack(roomy, 0.06) == pytest.approx(0.02 + 49.5 - 0.06 - 0.017 - 48.5)
    urgent_later = request("urgent-later", 8, 0.07, SLO(ttft=0.3, tpot=0.05))
    assert policy.rank(urgent_later) < policy.rank(roomy)
    # A looser decode that has banked nothing is not preempted: first token at 0.02 s, and its 4 tokens
    # left at its 60 ms TPOT take all the time to its last token's due date (0.26 s).
    clock.t = 0.03
    fresh = _decoding(request("batch-fresh", 4, 0.0, SLO(ttft=10.0, tpot=0.06), max_tokens=5), [0.02])
    assert not policy.preempts(request("chat-2", 8, 0.03, INTERACTIVE), fresh)
    # One that decoded 3 tokens 10 ms apart banked 2 x 50 ms: at 0.04 s it can pause for an 18 ms prefill
    # (0.26 - 0.04 - 17 ms of recompute - 2 x 60 ms = 83 ms); at 0.25 s the bank is spent.
    ahead = _decoding(request("batch-ahead", 4, 0.0, SLO(ttft=10.0, tpot=0.06), max_tokens=5), [0.02, 0.03, 0.04])
    clock.t = 0.04
    assert policy.preempts(request("chat-2", 8, 0.04, INTERACTIVE), ahead)
    clock.t = 0.25
    assert not policy.preempts(request("chat-2", 8, 0.25, INTERACTIVE), ahead)


def _decoding(r: Request, token_times: list[float]) -> Request:
    r.output_token_ids, r.token_times = [7] * len(token_times), list(token_times)
    r.num_computed_tokens = r.num_tokens
    r.status = RequestStatus.RUNNING
    return r


def test_an_on_time_decode_gives_way_again_while_its_slack_allows_but_a_late_one_only_once():
    clock = ManualClock(0.0)
    policy = slo_scheduler(clock).policy
    chat = request("chat", 8, 0.04, INTERACTIVE)
    # Preempted once already, back and decoding with 3 s of slack banked against a 0.5 s TPOT: it gives way again.
    clock.t = 0.04
    roomy = _decoding(request("batch", 4, 0.0, BATCH, max_tokens=10), [0.01, 0.02, 0.03])
    roomy.num_preemptions = 1
    assert policy.preempts(chat, roomy)
    # Its slack spent (last token due at 0.01 + 9 x 0.5 s), it holds its seat, however often it gave way before.
    clock.t = 4.0
    assert not policy.preempts(request("chat-late-arrival", 8, 3.99, INTERACTIVE), roomy)
    # A decode that missed its first-token deadline gives way to an on-time request once, never twice.
    clock.t = 0.6
    late = _decoding(request("late", 4, 0.0, INTERACTIVE, max_tokens=50), [0.55])
    assert policy.preempts(request("chat-2", 8, 0.55, INTERACTIVE), late)
    late.num_preemptions = 1
    assert not policy.preempts(request("chat-3", 8, 0.55, INTERACTIVE), late)
