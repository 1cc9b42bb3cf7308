"""The CUDA path's device check: correctness against transformers, Llama-3-8B-shaped speed against the
memory-bandwidth limit and transformers, and a step-time profile for the simulator. One table.

Run on a GPU machine from the repository root (needs torch with CUDA, triton, transformers; no server
packages, no network):

    PYTHONPATH=. python benchmarks/gpu_check.py --out results/

`--device cpu --small` runs the same script on a CPU with small shapes, to check the script itself.
Every section runs even if an earlier one failed; failures are reported in the table.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sloserve import LLM, SamplingParams  # noqa: E402
from tests.conftest import CONFIGS, save_tiny_model  # noqa: E402

MAX_TOKENS = 20
PROMPT_LENS = (3, 17, 40, 31, 9, 64)
SCENARIOS = {  # the engine knobs that change how a step is batched
    "graphs": dict(),
    "eager": dict(enforce_eager=True),
    "chunked_prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(block_size=4, num_kv_blocks=40),
    "no_prefix_cache": dict(enable_prefix_caching=False),
    "ngram_speculation": dict(speculative_config={"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4,
                                                  "num_speculative_tokens": 3}),
}
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
SMALL = dict(LLAMA3_8B, vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
             rope_parameters=dict(LLAMA3_8B["rope_parameters"], original_max_position_embeddings=4096))


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []  # (measure, value, target / verdict)
        self.data: dict = {}

    def add(self, measure: str, value: str, verdict: str = "") -> None:
        self.rows.append((measure, value, verdict))
        print(f"| {measure} | {value} | {verdict} |", flush=True)

    def section(self, name: str, fn, *args) -> None:
        start = time.perf_counter()
        try:
            fn(self, *args)
        except Exception as exc:  # report and go on: one failing section must not hide the others
            traceback.print_exc()
            self.add(f"{name}: FAILED", f"{type(exc).__name__}: {str(exc)[:200]}")
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def table(self) -> str:
        lines = ["| measure | value | target / verdict |", "|---|---|---|"]
        return "\n".join(lines + [f"| {m} | {v} | {t} |" for m, v, t in self.rows])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def correctness(report: Report, device: str, workdir: Path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 384, (n,), generator=g).tolist() for n in PROMPT_LENS]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    for kind in CONFIGS:
        model_dir = save_tiny_model(kind, workdir / kind)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        expected = [hf.generate(torch.tensor([p], device=device), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(p):].tolist()
                    for p in prompts]
        equal = []
        for name, knobs in SCENARIOS.items():
            llm = LLM(str(model_dir), dtype="float32", device=device, max_num_seqs=8, kv_cache_memory_bytes=64 << 20, **knobs)
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
            blocks = llm.engine.block_manager
            ok = [o.outputs[0].token_ids for o in outs] == expected and blocks.num_free_blocks == blocks.num_blocks
            equal.append(name if ok else f"{name} DIFFERS")
        verdict = "ok" if all("DIFFERS" not in e for e in equal) else "FAIL"
        report.add(f"greedy fp32 = transformers, {kind}", ", ".join(equal), verdict)
        report.data.setdefault("correctness", {})[kind] = equal
        if kind == "llama":
            hf = hf.to(torch.bfloat16)
            first = [int(hf.generate(torch.tensor([p], device=device), max_new_tokens=1, do_sample=False)[0, -1]) for p in prompts]
            llm = LLM(str(model_dir), dtype="bfloat16", device=device, max_num_seqs=8, kv_cache_memory_bytes=64 << 20)
            ours = [o.outputs[0].token_ids[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=1, temperature=0))]
            agree = sum(a == b for a, b in zip(first, ours))
            report.add("bf16 first token = transformers, llama", f"{agree}/{len(prompts)}", "ok" if agree == len(prompts) else "FAIL")


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy, counting bytes read and written (bytes/s)."""
    n = (2 << 30) if device.startswith("cuda") else (256 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * n * 10 / (time.perf_counter() - start)


def big_model_dir(workdir: Path, small: bool) -> Path:
    path = workdir / "llama3-8b-shape"
    LlamaConfig(**(SMALL if small else LLAMA3_8B)).save_pretrained(path)
    return path


def random_prompts(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [torch.randint(1000 % vocab, vocab, (k,), generator=g).tolist() for k in lens]


def speed(report: Report, device: str, workdir: Path, small: bool) -> None:
    model_dir = big_model_dir(workdir, small)
    bandwidth = copy_bandwidth(device)
    report.add("device copy bandwidth (read + write)", f"{bandwidth / 1e12:.2f} TB/s")
    start = time.perf_counter()
    llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", device=device, max_num_seqs=64,
              max_num_batched_tokens=2048, gpu_memory_utilization=0.55)
    report.add("engine start (dummy weights, KV sizing, graph capture)", f"{time.perf_counter() - start:.1f} s",
               f"{llm.engine.executor.num_kv_blocks} KV blocks")
    model = llm.engine.executor.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    limit_ms = weight_bytes / bandwidth * 1e3
    vocab = model.shape.vocab_size

    # One request decoding: the step time against weight bytes / bandwidth.
    decode = SamplingParams(max_tokens=129, temperature=0, ignore_eos=True)
    prompt = random_prompts(1, 128, 128, vocab, 1)
    llm.generate(prompt_token_ids=prompt, sampling_params=decode)  # warm
    steps = []
    for _ in range(3):
        times = llm.generate(prompt_token_ids=prompt, sampling_params=decode)[0].outputs[0].token_times
        steps.append(statistics.median(b - a for a, b in zip(times[1:], times[2:])))
    step_ms = min(steps) * 1e3
    report.add("decode step, 1 request (ms): sloserve / bandwidth limit",
               f"{step_ms:.2f} / {limit_ms:.2f} = {step_ms / limit_ms:.2f}x", "target <= 1.5x")
    graphs, llm.engine.executor.graphs = llm.engine.executor.graphs, None  # the same engine, launched op by op
    times = llm.generate(prompt_token_ids=prompt, sampling_params=decode)[0].outputs[0].token_times
    eager_ms = statistics.median(b - a for a, b in zip(times[1:], times[2:])) * 1e3
    llm.engine.executor.graphs = graphs
    report.add("decode step, 1 request, eager (no CUDA graphs) (ms)", f"{eager_ms:.2f}", f"graphs {eager_ms / step_ms:.2f}x faster")
    report.data["decode"] = dict(step_ms=steps, limit_ms=limit_ms, weight_bytes=weight_bytes, bandwidth=bandwidth)

    # Prefill of 2,048 tokens, and 64 concurrent requests, against transformers.
    # A fresh prompt each time: a repeated one would be served from the prefix cache, not prefilled.
    prefill_prompts = [random_prompts(1, 2048, 2048, vocab, 10 + i) for i in range(4)]
    prefill_prompt = prefill_prompts[0]
    one = SamplingParams(max_tokens=1, temperature=0)
    llm.generate(prompt_token_ids=prefill_prompt, sampling_params=one)
    ours_prefill = []
    for prompt_ in prefill_prompts[1:]:
        start = time.perf_counter()
        llm.generate(prompt_token_ids=prompt_, sampling_params=one)
        ours_prefill.append(time.perf_counter() - start)
    batch_prompts = random_prompts(64, 128, 512, vocab, 3)
    new = 128
    batch = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=batch_prompts[:8], sampling_params=SamplingParams(max_tokens=8, ignore_eos=True))
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=batch_prompts, sampling_params=batch)
    ours_batch = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
    del llm, model, outs
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(LlamaConfig(**(SMALL if small else LLAMA3_8B)), dtype=torch.bfloat16).eval()
    ids = torch.tensor(prefill_prompt, device=device)
    hf_prefill = []
    with torch.inference_mode():
        hf(ids, logits_to_keep=1)
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            hf(ids, logits_to_keep=1)
            sync(device)
            hf_prefill.append(time.perf_counter() - start)
    report.add("prefill 2,048 tokens (ms): sloserve / transformers",
               f"{min(ours_prefill) * 1e3:.1f} / {min(hf_prefill) * 1e3:.1f} = {min(hf_prefill) / min(ours_prefill):.2f}x faster")
    longest = max(len(p) for p in batch_prompts)
    padded = torch.zeros(len(batch_prompts), longest, dtype=torch.long, device=device)
    mask = torch.zeros_like(padded)
    for i, p in enumerate(batch_prompts):  # left padding, as generate wants for decoder-only models
        padded[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(padded[:8], attention_mask=mask[:8], max_new_tokens=8, do_sample=False, pad_token_id=0)
        sync(device)
        start = time.perf_counter()
        out = hf.generate(padded, **kwargs)
        sync(device)
    hf_batch = (out.shape[1] - longest) * len(batch_prompts) / (time.perf_counter() - start)
    report.add("64 concurrent requests, output tok/s: sloserve / transformers padded generate",
               f"{ours_batch:.0f} / {hf_batch:.0f} = {ours_batch / hf_batch:.2f}x", "target >= 5x")
    report.data["prefill_s"] = dict(sloserve=ours_prefill, transformers=hf_prefill)
    report.data["batch_tok_s"] = dict(sloserve=ours_batch, transformers=hf_batch)


def profile(report: Report, device: str, workdir: Path, small: bool, out_dir: Path) -> None:
    from sloserve.config import EngineConfig
    from sloserve.sim.profiler import ProfileSettings, profile_model

    config = EngineConfig(model=str(big_model_dir(workdir, small)), load_format="dummy", dtype="bfloat16",
                          device=device, max_num_seqs=64, max_num_batched_tokens=2048, gpu_memory_utilization=0.8)
    start = time.perf_counter()
    result = profile_model(config, ProfileSettings(), log=lambda line: print(line, flush=True))
    name = f"{'small' if small else 'llama3-8b'}-{device.split(':')[0]}.json"
    result.save(str(out_dir / name))
    report.add("sloserve profile (grid + engine run)", f"{time.perf_counter() - start:.0f} s, {len(result.execute_timings)} timed steps",
               f"saved {name}; held-out execute error {result.execute.heldout.to_dict()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a small model instead of Llama-3-8B's shape")
    parser.add_argument("--sections", default="correctness,speed,profile")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report.add("device", name, f"torch {torch.__version__}")
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "correctness" in sections:
            report.section("correctness", correctness, args.device, workdir)
        if "speed" in sections:
            report.section("speed", speed, args.device, workdir, args.small)
        if "profile" in sections:
            report.section("profile", profile, args.device, workdir, args.small, args.out)
    print("\n" + report.table())
    (args.out / "gpu_check.md").write_text(report.table() + "\n")
    (args.out / "gpu_check.json").write_text(json.dumps(report.data, indent=1, default=str))


if __name__ == "__main__":
    main()
