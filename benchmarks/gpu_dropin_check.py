"""Device check of the vLLM sampling fields on CUDA: penalties, min_tokens and min_p give the CPU's (and
transformers') greedy tokens, and the offline shapes hold. Prints one table; exits 1 on a mismatch.

    PYTHONPATH=. python benchmarks/gpu_dropin_check.py        (--device cpu: check the script itself on a CPU)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sloserve import LLM, SamplingParams  # noqa: E402
from tests.conftest import save_tiny_model  # noqa: E402

PROMPTS = [[5, 9, 22, 31, 7, 100, 250], [3, 4, 3, 4, 3, 4], list(range(40, 80))]
CASES = {
    "repetition_penalty": dict(repetition_penalty=1.8),
    "presence+frequency": dict(presence_penalty=1.5, frequency_penalty=0.7),
    "min_tokens+stop_id": dict(min_tokens=6, stop_token_ids=[7]),
    "min_p (greedy-invariant)": dict(min_p=0.3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    model_dir = save_tiny_model("llama", Path(tempfile.mkdtemp()))
    llms = {"cpu": LLM(str(model_dir), dtype="float32", device="cpu"),
            "cuda": LLM(str(model_dir), dtype="float32", device=device)}
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    failures = 0
    print(f"{'case':>26} {'cuda == cpu':>12} {'== transformers':>16}")
    for name, knobs in CASES.items():
        # transformers stops at EOS: so does the case compared with it.
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=name != "repetition_penalty", **knobs)
        outs = {dev: [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]
                for dev, llm in llms.items()}
        same = outs["cuda"] == outs["cpu"]
        reference = "n/a"
        if name == "repetition_penalty":
            expected = [hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                                    repetition_penalty=1.8)[0, len(p):].tolist() for p in PROMPTS]
            reference = str(expected == outs["cuda"])
            failures += expected != outs["cuda"]
        failures += not same
        print(f"{name:>26} {str(same):>12} {reference:>16}")
    sampled = llms["cuda"].generate([{"prompt_token_ids": PROMPTS[0]}],
                                    SamplingParams(max_tokens=16, temperature=0.8, min_p=0.2, seed=3))[0]
    shapes_ok = len(sampled.outputs[0].token_ids) == 16 and sampled.prompt is None and sampled.finished
    failures += not shapes_ok
    print(f"{'sampled min_p run, shapes':>26} {str(shapes_ok):>12}")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    print(f"device: {name}; failures: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
