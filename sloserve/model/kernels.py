"""sloserve's C++ CPU kernels (csrc/*.cpp): compiled on first use, cached per machine, optional.

They are built with PyTorch's own extension builder the first time a process asks for them (about a
minute; later processes load the cached library in well under a second). Where no compiler is at hand
the engine runs the same arithmetic as plain PyTorch ops (sloserve/model/ops.py), only slower.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "cpu_ops.cpp", CSRC / "skinny_matmul.cpp")
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
    logger.info("loading sloserve's C++ kernels (compiled on this machine's first use: ~30 s)")
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"sloserve_cpu_ops_{_build_tag()}",
            sources=[str(source) for source in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: all mean "use the PyTorch path"
        logger.warning("sloserve's C++ kernels are unavailable (%s); using the slower PyTorch ops path", exc)
        return None
