"""A position's logits do not depend on how its step was batched: computed as a plain decode (alone) or
as one row of a speculative verification beside other requests' decodes, verifications and prompt chunks,
they are bit-identical, and so is the key/value it leaves in the cache. In bfloat16 any other rounding
flips near-tied greedy tokens, and greedy speculative decoding would differ from plain decoding by luck."""
import pytest
import torch

from sloserve import SamplingParams
from sloserve.cli_args import default_model_dir
from sloserve.config import EngineConfig
from sloserve.engine.scheduler import SchedulerOutput, ScheduledRequest
from sloserve.model.loader import load_model
from sloserve.model.runner import ModelExecutor

BLOCK = 4  # small blocks: contexts cross many of them
GREEDY = SamplingParams(temperature=0)
K = 4  # drafts per verification
TARGET_PROMPT = 13
OTHERS = 40  # other requests, each with a short prompt of its own length


def executor(model_dir, built_kernels) -> ModelExecutor:
    assert built_kernels is not None, "sloserve's C++ kernels failed to build"
    config = EngineConfig(model=str(model_dir), dtype="bfloat16", device="cpu", block_size=BLOCK, num_kv_blocks=512,
                          skip_tokenizer_init=True, max_num_batched_tokens=4096)
    return ModelExecutor(load_model(config), config)


class Requests:
    """Requests with prompts already prefilled (block tables of their own) and tokens to feed next."""

    def __init__(self, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.prompts = {"target": torch.randint(2, vocab, (TARGET_PROMPT,), generator=g).tolist()}
        for i in range(OTHERS):
            self.prompts[f"r{i}"] = torch.randint(2, vocab, (3 + i % 11,), generator=g).tolist()
        self.next_tokens = {rid: torch.randint(2, vocab, (K + 1,), generator=g).tolist() for rid in self.prompts}
        # a prompt prefilled beside them, longer than the kernel's limit on prompt rows (they go to oneDNN)
        self.chunk = torch.randint(2, vocab, (47,), generator=g).tolist()
        self.tables, free = {}, 0
        for rid, prompt in list(self.prompts.items()) + [("chunk", self.chunk)]:
            blocks = -(-(len(prompt) + K + 1) // BLOCK)
            self.tables[rid], free = list(range(free, free + blocks)), free + blocks

    def prefill(self, rid: str) -> ScheduledRequest:
        prompt = self.prompts[rid]
        return ScheduledRequest(rid, prompt, 0, len(prompt), True, self.tables[rid], GREEDY)

    def decode(self, rid: str, i: int = 0) -> ScheduledRequest:
        """Feeds next_tokens[i] at the position after the prompt and the i tokens before it."""
        start = len(self.prompts[rid]) + i
        return ScheduledRequest(rid, [self.next_tokens[rid][i]], start, 1, True, self.tables[rid], GREEDY)

    def verify(self, rid: str) -> ScheduledRequest:
        """Feeds all next_tokens at once: the last one sampled and K drafts after it."""
        tokens = self.next_tokens[rid]
        return ScheduledRequest(rid, tokens, len(self.prompts[rid]), K + 1, True, self.tables[rid], GREEDY,
                                spec_token_ids=tokens[1:])

    def chunk_prefill(self) -> ScheduledRequest:
        return ScheduledRequest("chunk", self.chunk, 0, len(self.chunk), True, self.tables["chunk"], GREEDY)


def rows_of(executor: ModelExecutor, plan: list[ScheduledRequest], rid: str) -> torch.Tensor:
    sampling, logits = executor.forward(SchedulerOutput(plan))
    row = 0
    for s in sampling:
        n = len(s.spec_token_ids) + 1
        if s.request_id == rid:
            return logits[row : row + n].clone()
        row += n
    raise AssertionError(f"{rid} was not sampled")


def target_kv(executor: ModelExecutor, requests: Requests) -> list[torch.Tensor]:
    start, table = len(requests.prompts["target"]), requests.tables["target"]
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + K + 1)])
    return [cache.index_select(0, slots) for pair in executor.kv_caches for cache in pair]


# The target's verification beside: nothing; other decodes past the kernel's old 16-row limit; decodes,
# another verification and a prompt chunk (a step mixing decode arithmetic with prefill); and more
# decode rows than any matmul row limit.
BATCHES = {
    "alone": lambda r: [r.verify("target")],
    "beside_decodes": lambda r: [r.decode(f"r{i}") for i in range(14)] + [r.verify("target")],
    "mixed": lambda r: ([r.decode(f"r{i}") for i in range(12)] + [r.verify("r12"), r.verify("target"), r.chunk_prefill()]),
    "many": lambda r: [r.verify(f"r{i}") for i in range(20)] + [r.verify("target")],
}


@pytest.mark.parametrize("model", ["demo", "qwen3"])
def test_a_verification_row_equals_the_plain_decode_of_its_position(model, tiny_model_dir, built_kernels):
    ex = executor(default_model_dir() if model == "demo" else tiny_model_dir("qwen3"), built_kernels)
    requests = Requests(ex.model.shape.vocab_size)
    ex.forward(SchedulerOutput([requests.prefill(rid) for rid in requests.prompts]))
    prefilled = [cache.clone() for pair in ex.kv_caches for cache in pair]

    def restore():
        for cache, saved in zip((c for pair in ex.kv_caches for c in pair), prefilled):
            cache.copy_(saved)

    plain = torch.cat([rows_of(ex, [requests.decode("target", i)], "target") for i in range(K + 1)])
    plain_kv = target_kv(ex, requests)
    for name, batch in BATCHES.items():
        restore()
        verified = rows_of(ex, batch(requests), "target")
        for i in range(K + 1):
            assert torch.equal(verified[i], plain[i]), f"{model}: position {i} of the verification differs ({name})"
        assert all(torch.equal(a, b) for a, b in zip(target_kv(ex, requests), plain_kv)), f"{model}: KV differs ({name})"
