"""Rejection sampling (Leviathan et al.): emitted tokens follow the target's distribution, whatever the draft's."""
import numpy as np
import torch

from sloserve.model.sampler import Sampler
from sloserve.request import SamplingParams
from sloserve.spec.rejection import verify

VOCAB, TRIALS = 8, 20000
PARAMS = SamplingParams(temperature=1.0)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# Far above the chi-square's mean (VOCAB - 1 = 7) and its spread (sd ~3.7): fails by chance about 1e-6.
LIMIT = 40.0


def run(draft_probs: torch.Tensor | None, fixed_drafts: list[int] | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1)) * 1.5
    firsts, seconds_after_accept = np.zeros(VOCAB), np.zeros(VOCAB)
    for _ in range(TRIALS):
        if draft_probs is None:
            drafts = fixed_drafts
        else:
            drafts = [int(torch.multinomial(draft_probs[i], 1, generator=g)) for i in range(2)]
        out = verify(logits, drafts, PARAMS, lambda row: Sampler.probabilities(row, PARAMS, "r"), g, draft_probs)
        firsts[out[0]] += 1
        if out[0] == drafts[0]:
            seconds_after_accept[out[1]] += 1
    target = torch.softmax(logits, -1).numpy().astype(float)
    return firsts, seconds_after_accept, target


def test_draft_model_drafts_leave_the_target_distribution():
    q = torch.softmax(torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2)) * 1.5, -1)
    firsts, seconds, target = run(q)
    assert chi_square(firsts, target[0]) < LIMIT
    assert chi_square(seconds, target[1]) < LIMIT  # the next position, given the first draft was accepted
    # The check can fail: the draft's own samples are far from the target's distribution.
    assert chi_square(np.bincount(torch.multinomial(q[0], TRIALS, replacement=True).numpy(), minlength=VOCAB), target[0]) > 10 * LIMIT


def test_deterministic_drafts_leave_the_target_distribution():
    firsts, seconds, target = run(None, fixed_drafts=[3, 5])
    assert chi_square(firsts, target[0]) < LIMIT
    assert chi_square(seconds, target[1]) < LIMIT


def test_greedy_accepts_up_to_the_first_mismatch_then_corrects():
    logits = torch.full((4, VOCAB), -1.0)
    for row, best in enumerate([2, 4, 6, 7]):
        logits[row, best] = 1.0
    assert verify(logits, [2, 4, 6], SamplingParams(temperature=0), None, None) == [2, 4, 6, 7]
    assert verify(logits, [2, 5, 6], SamplingParams(temperature=0), None, None) == [2, 4]
    assert verify(logits[:1], [], SamplingParams(temperature=0), None, None) == [2]
