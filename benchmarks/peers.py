"""Peer systems (llama.cpp, Hugging Face transformers) timed by benchmarks/decode_vs_peers.py."""

from __future__ import annotations

import ctypes
import logging
import os
import time

import numpy as np

# Token ids below this are <unk>, <s>, </s>; workloads avoid them so no system treats a prompt
# token specially.
FIRST_PLAIN_TOKEN = 3
_N_SPECIAL = 3
_N_BYTE_TOKENS = 256
_INIT_STD = 0.02


# ---------------------------------------------------------------------------------------------
# GGUF writing
# ---------------------------------------------------------------------------------------------


def _rope_theta(config: dict) -> float:
    # transformers 5 moves rope_theta into rope_parameters; accept both spellings.
    if "rope_theta" in config:
        return float(config["rope_theta"])
    return float(config.get("rope_parameters", {}).get("rope_theta", 10000.0))


def _synthetic_spm_vocab(vocab_size: int):
    """An SPM ("llama") vocab: 3 specials, the 256 byte tokens llama.cpp looks up, then <t{i}>."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(_N_BYTE_TOKENS)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * _N_BYTE_TOKENS
    n_plain = vocab_size - len(tokens)
    if n_plain < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(tokens)} fixed tokens")
    tokens += [f"<t{i}>" for i in range(len(tokens), vocab_size)]
    types += [gguf.TokenType.NORMAL] * n_plain
    scores = [0.0] * _N_SPECIAL + [0.0] * _N_BYTE_TOKENS + [-float(i) for i in range(n_plain)]
    return tokens, scores, types


def _add_tensor(writer, name: str, array: np.ndarray, dtype: str) -> None:
    import gguf

    # llama.cpp keeps 1-d tensors (norms) in f32 whatever the file type, as its converter does.
    qtype = {"bfloat16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}.get(dtype)
    if qtype is not None and array.ndim > 1:
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, array.astype(np.float32, copy=False))


def _llama_tensors(config: dict, rng: np.random.Generator):
    """Yield (gguf name, array in PyTorch (out, in) layout) for a random-weight Llama."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    ffn = config["intermediate_size"]

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(_INIT_STD)

    yield "token_embd.weight", normal(config["vocab_size"], hidden)
    if not config.get("tie_word_embeddings", False):
        yield "output.weight", normal(config["vocab_size"], hidden)
    yield "output_norm.weight", np.ones(hidden, dtype=np.float32)
    for i in range(config["num_hidden_layers"]):
        yield f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32)
        yield f"blk.{i}.attn_q.weight", normal(q_out, hidden)
        yield f"blk.{i}.attn_k.weight", normal(kv_out, hidden)
        yield f"blk.{i}.attn_v.weight", normal(kv_out, hidden)
        yield f"blk.{i}.attn_output.weight", normal(hidden, q_out)
        yield f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32)
        yield f"blk.{i}.ffn_gate.weight", normal(ffn, hidden)
        yield f"blk.{i}.ffn_up.weight", normal(ffn, hidden)
        yield f"blk.{i}.ffn_down.weight", normal(hidden, ffn)


GGUF_FILE_TYPES = {"float32": "ALL_F32", "bfloat16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
# Bytes a matrix weight takes in each GGUF type (q8_0: 32 int8 values and one fp16 scale per block).
GGUF_BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "q8_0": 34 / 32}


def write_gguf(config: dict, path: str, dtype: str = "bfloat16", seed: int = 0) -> str:
    """Write a random-weight Llama GGUF of the shape in `config` (HF LlamaConfig keys).

    dtype is "float32", "bfloat16" or "q8_0" (matrices, the embedding too as llama.cpp's converter
    does; norms stay f32). Only speed is measured, so the weights are plain N(0, 0.02) draws (not
    HF's) and Q/K are not permuted for rotary layout.
    """
    import gguf

    if dtype not in GGUF_FILE_TYPES:
        raise ValueError(f"unsupported GGUF dtype {dtype!r}")
    hidden = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // n_heads

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("sloserve-dummy-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(getattr(gguf.LlamaFileType, GGUF_FILE_TYPES[dtype]))

    tokens, scores, types = _synthetic_spm_vocab(config["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    rng = np.random.default_rng(seed)
    for name, array in _llama_tensors(config, rng):
        _add_tensor(writer, name, array, dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------------------------
# Shared result helpers
# ---------------------------------------------------------------------------------------------


def decode_rate(token_times: list[float]) -> float:
    """Tokens/s over the gaps after the first token, i.e. decode steps only (no prefill)."""
    if len(token_times) < 2:
        raise ValueError("need at least two generated tokens to time decode")
    return (len(token_times) - 1) / (token_times[-1] - token_times[0])


def batch_result(seconds: float, prompts: list[list[int]], outputs: list[int], **extra) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    generated = sum(outputs)
    return {
        "seconds": seconds,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "total_tok_s": (prompt_tokens + generated) / seconds,
        "generated_tok_s": generated / seconds,
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# llama.cpp
# ---------------------------------------------------------------------------------------------


def llama_cpp_version() -> str:
    import llama_cpp

    text = f"llama-cpp-python {llama_cpp.__version__}"
    # The wheel does not say which llama.cpp it vendors; ggml's own version and commit do.
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    try:
        lib.ggml_version.restype = lib.ggml_commit.restype = ctypes.c_char_p
        text += f" (ggml {lib.ggml_version().decode()}, commit {lib.ggml_commit().decode()})"
    except AttributeError:  # older ggml without the version symbols
        pass
    return text


def llama_cpp_system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode().strip()


class _LlamaCppContext:
    """One llama.cpp context plus a reusable token batch, driven by greedy argmax in numpy."""

    def __init__(self, model, n_vocab: int, n_threads: int, n_seqs: int, seq_len: int,
                 n_batch: int):
        import llama_cpp

        self._lib = llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = n_seqs
        # Non-unified KV: each sequence gets its own seq_len cells, so attention never scans
        # other requests' cache.
        params.kv_unified = False
        params.n_ctx = n_seqs * seq_len
        params.n_batch = n_batch
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.flash_attn_type = params.flash_attn_type
        self._n_vocab = n_vocab
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        if self.ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self.ctx)
            self.ctx = None

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Run (token, pos, seq, wants_logits) entries; return argmax ids of the flagged rows."""
        b = self._batch
        for i, (tok, pos, seq, wants) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = wants
        b.n_tokens = len(entries)
        rc = self._lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n_out = sum(1 for e in entries if e[3])
        if n_out == 0:
            return np.empty(0, dtype=np.int64)
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self.ctx),
                                       shape=(n_out, self._n_vocab))
        return logits.argmax(axis=1)

    def generate(self, prompts: list[list[int]], n_new: list[int]):
        """Prefill every prompt, then decode all live sequences one step at a time.

        Returns (tokens, times): each sequence's generated ids and the time.perf_counter() at
        which each appeared. EOS is never checked, so sequence i yields exactly n_new[i] tokens.
        """
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)
        tokens = [[t] for t in self._prefill(prompts)]
        now = time.perf_counter()
        times = [[now] for _ in prompts]
        live = [i for i, n in enumerate(n_new) if n > 1]
        while live:
            step = [(tokens[i][-1], len(prompts[i]) + len(tokens[i]) - 1, i, True) for i in live]
            nxt = self._decode(step)
            now = time.perf_counter()
            for row, i in enumerate(live):
                tokens[i].append(int(nxt[row]))
                times[i].append(now)
            live = [i for i in live if len(tokens[i]) < n_new[i]]
        return tokens, times

    def _prefill(self, prompts: list[list[int]]) -> list[int]:
        """Feed prompts in n_batch-token chunks; return each prompt's first generated token."""
        entries = [(tok, pos, seq, pos == len(p) - 1)
                   for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
        firsts: list[int] = []
        for start in range(0, len(entries), self._n_batch):
            firsts.extend(int(t) for t in self._decode(entries[start:start + self._n_batch]))
        return firsts


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python's C API: one single-sequence and one batch context.

    The batch path is a real multi-sequence llama_decode loop (all prompts prefilled, then one
    token per live sequence per step), not 32 sequential requests.
    """

    name = "llama.cpp"

    def __init__(self, gguf_path: str, n_threads: int = 2, max_seqs: int = 32,
                 max_seq_len: int = 768, n_batch: int = 2048):
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        self._lib = llama_cpp
        self.model = llama_cpp.llama_model_load_from_file(
            gguf_path.encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self._single = _LlamaCppContext(self.model, n_vocab, n_threads, 1, max_seq_len, n_batch)
        self._multi = _LlamaCppContext(self.model, n_vocab, n_threads, max_seqs, max_seq_len,
                                       n_batch)

    def close(self) -> None:
        self._single.close()
        self._multi.close()
        if self.model:
            self._lib.llama_model_free(self.model)
            self.model = None

    def prefill_seconds(self, prompt_ids: list[int]) -> float:
        start = time.perf_counter()
        _, times = self._single.generate([prompt_ids], [1])
        return times[0][0] - start

    def decode_tokens_per_s(self, prompt_ids: list[int], n_new: int) -> float:
        _, times = self._single.generate([prompt_ids], [n_new])
        return decode_rate(times[0])

    def batch_tokens_per_s(self, prompts: list[list[int]], outputs: list[int]) -> dict:
        start = time.perf_counter()
        _, times = self._multi.generate(prompts, outputs)
        seconds = max(t[-1] for t in times) - start
        return batch_result(seconds, prompts, outputs, mode="batched llama_decode")


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------


class _TokenClock:
    """A generate() streamer that only records when each new token appears."""

    def __init__(self):
        self.times: list[float] = []
        self._saw_prompt = False

    def put(self, value) -> None:
        # generate() first pushes the prompt; every later put is one new token per sequence.
        if self._saw_prompt:
            self.times.append(time.perf_counter())
        self._saw_prompt = True

    def end(self) -> None:
        pass


class HFPeer:
    """transformers LlamaForCausalLM with random weights, greedy generate(), default attention."""

    name = "hf"

    def __init__(self, config: dict, dtype: str = "bfloat16", seed: int = 0, pad_token_id: int = 0):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        self._torch = torch
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**config))
        self.model = model.to(getattr(torch, dtype)).eval()
        self.attn_implementation = self.model.config._attn_implementation
        self._pad = pad_token_id

    def _generate(self, input_ids, attention_mask, n_new: int, streamer=None):
        with self._torch.inference_mode():
            return self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n_new,
                min_new_tokens=n_new,  # suppresses EOS so exactly n_new tokens come out
                do_sample=False, pad_token_id=self._pad, streamer=streamer)

    def _single(self, prompt_ids: list[int]):
        ids = self._torch.tensor([prompt_ids], dtype=self._torch.long)
        return ids, self._torch.ones_like(ids)

    def prefill_seconds(self, prompt_ids: list[int]) -> float:
        ids, mask = self._single(prompt_ids)
        start = time.perf_counter()
        self._generate(ids, mask, 1)
        return time.perf_counter() - start

    def decode_tokens_per_s(self, prompt_ids: list[int], n_new: int) -> float:
        ids, mask = self._single(prompt_ids)
        clock = _TokenClock()
        out = self._generate(ids, mask, n_new, streamer=clock)
        assert out.shape[1] - ids.shape[1] == n_new
        return decode_rate(clock.times)

    def _left_padded(self, prompts: list[list[int]]):
        width = max(len(p) for p in prompts)
        ids = self._torch.full((len(prompts), width), self._pad, dtype=self._torch.long)
        mask = self._torch.zeros((len(prompts), width), dtype=self._torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = self._torch.tensor(p)
            mask[row, width - len(p):] = 1
        return ids, mask

    def batch_tokens_per_s(self, prompts: list[list[int]], outputs: list[int]) -> dict:
        """One padded generate() of max(outputs) tokens; only requested tokens are counted."""
        ids, mask = self._left_padded(prompts)
        start = time.perf_counter()
        self._generate(ids, mask, max(outputs))
        seconds = time.perf_counter() - start
        return batch_result(seconds, prompts, outputs,
                            mode=f"padded generate to {ids.shape[1]}+{max(outputs)}")
