"""Test kit for the server: a tiny Llama with a small trained BPE tokenizer, live uvicorn servers, metric parsing."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from sloserve.config import EngineConfig
from sloserve.llm import build_engine
from sloserve.server.app import build_app
from sloserve.server.cli import bind_socket
from sloserve.server.settings import ServerSettings

SPECIAL_TOKENS = ["<|bos|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]  # ids 0..4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = """\
The quick brown fox jumps over the lazy dog. A server answers every request, or says clearly why not.
Latency is what a user feels: the time to the first token, and the time between the tokens after it.
Batching many requests into one step keeps the machine busy, while a bounded queue keeps waits short.
Shall I compare thee to a summer's day? Thou art more lovely and more temperate.
Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000; punctuation ,.;:!?'"()[]{} and some unicode: café, naïve, 東京.
"""
MODEL_NAME = "tiny-chat"


def save_tokenizer(path: Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def save_chat_model(path: Path) -> Path:
    """A tiny Llama config (weights come from --load-format dummy) with the tokenizer beside it."""
    tokenizer = save_tokenizer(path)
    LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
        bos_token_id=0, eos_token_id=tokenizer.eos_token_id,
    ).save_pretrained(path)
    return path


class LiveServer:
    """A real uvicorn server in a thread, on a loopback port picked by the OS."""

    def __init__(self, model_dir: Path, *, engine_kwargs: dict | None = None, step_delay_s: float = 0.0,
                 uvicorn_kwargs: dict | None = None, **settings) -> None:
        engine_args = dict(load_format="dummy", max_num_seqs=16, num_kv_blocks=128) | (engine_kwargs or {})
        engine = build_engine(EngineConfig(model=str(model_dir), **engine_args))
        if step_delay_s:  # slow the engine down so a test can act while requests are mid-flight
            step = engine.step

            def slow_step():
                time.sleep(step_delay_s)
                return step()

            engine.step = slow_step
        self.engine = engine
        settings.setdefault("served_model_names", [MODEL_NAME])
        self.app = build_app(engine, ServerSettings(**settings))
        self.ctx = self.app.state.server
        sock = bind_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on", **(uvicorn_kwargs or {})))
        self.loop: asyncio.AbstractEventLoop | None = None

        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[sock])

        self.thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def call(self, coroutine, timeout: float = 30):
        """Run a coroutine on the server's event loop (where the engine front lives) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def metrics(self) -> dict[str, float]:
        """Sample name (with labels) -> value, from /metrics."""
        text = httpx.get(self.url + "/metrics").text
        return parse_metrics(text)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
