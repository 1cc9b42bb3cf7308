"""llama.cpp's `llama-server` as a benchmark peer: built once from the llama.cpp that llama-cpp-python's sdist
vendors, started on the random-weight GGUF that benchmarks/peers.py writes."""

# Run alone to build (or find) the binary and print its version: python benchmarks/llama_server.py
# The build lives in ~/.cache/sloserve-bench/ (SLOSERVE_BENCH_CACHE overrides): `pip download` of the sdist at the
# version pyproject's bench-peers extra pins, then `cmake -B build` + `cmake --build build --target llama-server`.
# A binary already there is reused. This is a benchmark peer, never a test dependency.

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # pyproject's bench-peers pin: the same llama.cpp the decode peers load
CACHE = Path(os.environ.get("SLOSERVE_BENCH_CACHE", Path.home() / ".cache" / "sloserve-bench"))
# Release, static, CPU only (GGML_NATIVE: built for this CPU, as the wheel's own build is); no web UI (its
# assets would be fetched from a hub this machine cannot reach), no tests or examples (build time).
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
                 "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF"]


def source_dir(version: str = LLAMA_CPP_PYTHON) -> Path:
    """The vendored llama.cpp of llama-cpp-python's sdist, downloaded and unpacked once."""
    unpacked = CACHE / f"llama_cpp_python-{version}"
    src = unpacked / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={version}", "-d", str(CACHE)], check=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(CACHE, filter="data")
    return src


def _build_tools() -> list[str]:
    """cmake (and ninja when present); pip installs cmake/ninja into this Python when the system has none."""
    missing = [t for t in ("cmake", "ninja") if shutil.which(t) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", *missing], check=True)
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def build(jobs: int = 2, version: str = LLAMA_CPP_PYTHON) -> tuple[Path, float]:
    """(path of llama-server, seconds the build took: 0 when a built binary was reused)."""
    src = source_dir(version)
    binary = src / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary, 0.0
    start = time.perf_counter()
    generator = _build_tools()
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), *generator, *CMAKE_OPTIONS], check=True)
    subprocess.run(["cmake", "--build", str(src / "build"), "--target", "llama-server", "-j", str(jobs)], check=True)
    return binary, time.perf_counter() - start


def version_of(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    return " ".join((out.stdout + out.stderr).split())


@dataclass(slots=True)
class LlamaServerOptions:
    """The flags llama-server runs under; `flags()` is what the report prints."""

    threads: int = 1
    parallel: int = 8  # slots (-np): requests decoded together by its continuous batching
    ctx_per_slot: int = 2048  # -c is the pool all slots share (--kv-unified, its default with automatic slots)
    batch: int = 512  # -b / -ub: prompt tokens per step, as sloserve's --max-num-batched-tokens 512
    cache_ram_mib: int = 8192  # --cache-ram: its host-memory prompt cache across slots (its default size)
    cache_reuse: int = 0  # --cache-reuse: its default (reuse the common prefix; no KV shifting of later chunks)

    def flags(self) -> list[str]:
        # Its defaults are spelled out so the report shows every setting the comparison depends on.
        return ["-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.parallel), "--kv-unified",
                "-c", str(self.ctx_per_slot * self.parallel), "-b", str(self.batch), "-ub", str(self.batch),
                "--cont-batching", "--cache-prompt", "--cache-ram", str(self.cache_ram_mib),
                "--cache-reuse", str(self.cache_reuse), "--no-webui"]


def command(binary: Path, gguf: Path, port: int, opts: LlamaServerOptions) -> list[str]:
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), *opts.flags()]


if __name__ == "__main__":
    path, seconds = build()
    print(f"{path}: {version_of(path)}; built in {seconds:.0f} s" if seconds else f"{path}: {version_of(path)} (reused)")
