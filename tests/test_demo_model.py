"""The bundled demo target/draft models load in HF transformers and generate; the trainer's smoke run works."""

import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sloserve

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(sloserve.__file__).resolve().parent / "assets"


def _check_pair(base: Path, require_text: bool, prompt: str = "To be, or not to be,", max_new: int = 12) -> None:
    tok = AutoTokenizer.from_pretrained(base / "demo-target")
    draft_tok = AutoTokenizer.from_pretrained(base / "demo-draft")
    # Speculative decoding compares token ids directly, so the vocabularies must be identical.
    assert tok.get_vocab() == draft_tok.get_vocab()
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|assistant|>\n")
    ids = tok(prompt, return_tensors="pt").input_ids
    for name in ("demo-target", "demo-draft"):
        model = AutoModelForCausalLM.from_pretrained(base / name)
        assert model.config.vocab_size == len(tok)
        assert model.config.eos_token_id == tok.eos_token_id
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
        assert out.shape[1] > ids.shape[1], name
        # A 20-second smoke model may well emit only newlines; the shipped ones must say something.
        if require_text:
            assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), name


def test_bundled_demo_models_load_and_generate():
    _check_pair(ASSETS, require_text=True)


def test_training_smoke_run(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_demo_model.py"), "--smoke", "--out", str(tmp_path)],
                         timeout=120, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-1000:] + res.stderr[-2000:]
    _check_pair(tmp_path, require_text=False, max_new=4)
