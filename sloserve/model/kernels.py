"""sloserve's C++ CPU kernels (csrc/*.cpp): compiled on first use, cached per machine, optional.

They are built with PyTorch's own extension builder the first time a process asks for them (about a
minute; later processes load the cached library in well under a second). Where no compiler is at hand
the engine runs the same arithmetic as plain PyTorch ops (sloserve/model/ops.py), only slower.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "cpu_ops.cpp", CSRC / "skinny_matmul.cpp", CSRC / "decode_stack.cpp")
# Without contraction the compiler keeps every multiply and add separately rounded, as PyTorch does.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]


def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags as the kernel reports them (/proc/cpuinfo), empty where unknown."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.split(":", 1)[1].split())


def _build_tag() -> str:
    """Names the build after this CPU's instruction sets (-march=native code must not meet another CPU)
    and after the sources and flags: checkouts with different sources sharing one extension cache
    must not rebuild over each other's library."""
    digest = hashlib.sha1(f"{platform.machine()} {sorted(cpu_flags()) or platform.processor()} {CFLAGS}".encode())
    for source in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.h")):  # headers change the build too
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


STALE_LOCK_SECONDS = 600  # far longer than a build takes


def clear_stale_lock(build_dir: Path, max_age: float = STALE_LOCK_SECONDS) -> bool:
    """PyTorch guards a build with a `lock` file that a killed build leaves behind, and every later load
    then waits on it forever: remove one older than any build. Returns whether one was removed."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age:
        return False
    logger.warning("removing a stale build lock %s (%.0f s old: a build was killed part-way)", lock, age)
    lock.unlink(missing_ok=True)
    return True


def wait_for_build_lock(build_dir: Path, max_age: float = STALE_LOCK_SECONDS, poll_s: float = 0.5,
                        sleep=time.sleep) -> None:
    """Wait out another process's build here rather than in PyTorch's own wait, which never looks at the lock's
    age: a build killed part-way would hold that wait, and every load already in it, forever."""
    while (build_dir / "lock").exists() and not clear_stale_lock(build_dir, max_age):
        sleep(poll_s)


def import_built(name: str, build_dir: Path) -> ModuleType | None:
    """The library this build tag names, imported without PyTorch's builder, or None if there is none yet.

    The builder takes the build lock even to find there is nothing to build, so a process killed in that moment
    (a timed-out test, a benchmark's server) left every later load waiting on the lock until it went stale; the
    tag already pins the sources and flags, so a library that exists is the one the builder would return."""
    library = build_dir / f"{name}.so"
    if not library.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # a link cut short: the builder redoes it
        return None
    return module


@functools.cache
def load_kernels() -> ModuleType | None:
    """The compiled kernels, or None (with a warning) where they cannot be built."""
    if platform.system() != "Linux":
        logger.warning("sloserve's C++ kernels are built on Linux only; using the PyTorch ops path")
        return None
    # The ninja that pip installs lies beside this interpreter, which need not be on PATH (an unactivated venv).
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(filter(None, (os.environ.get("PATH"), bin_dir)))
    name = f"sloserve_cpu_ops_{_build_tag()}"
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        build_dir = Path(_get_build_directory(name, verbose=False))
        built = import_built(name, build_dir)
        if built is not None:
            return built
        wait_for_build_lock(build_dir)
        if not any(build_dir.glob("*.so")):  # say so only when the wait is a compile
            logger.info("compiling sloserve's C++ kernels (this machine's first use: ~30-60 s)")
        return load(
            name=name,
            sources=[str(source) for source in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: all mean "use the PyTorch path"
        logger.warning("sloserve's C++ kernels are unavailable (%s); using the slower PyTorch ops path", exc)
        return None
