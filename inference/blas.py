"""Load an optimized BLAS before MLX so its CPU matmuls stop using the bundled reference BLAS.

The `mlx[cpu]` Linux wheel links a reference BLAS (about 4 GFLOP/s for fp32 1024^3 on 2 cores);
loading OpenBLAS with RTLD_GLOBAL before `import mlx.core` makes the dynamic linker resolve the
cblas symbols from it instead (about 14x faster). This module must run before mlx is imported,
so it imports nothing heavy and never imports mlx itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

BLAS_ENV_VAR = "RAG_BLAS_LIBRARY"  # a path to a libopenblas-like .so, or "none" to skip

# Debian's packages first (libopenblas0-pthread / -openmp / -serial), then other common places.
_SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-serial/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-serial/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


@dataclass(frozen=True)
class BlasStatus:
    """What `preload_blas` found; `rag doctor` prints it."""

    name: str  # "openblas", "accelerate", "reference" or "none"
    path: str | None
    optimized: bool
    detail: str


_status: BlasStatus | None = None

# OpenBLAS's own CPU detection fails on some VMs (a generic "Xeon Processor" model) and falls
# back to its Prescott (SSE3) kernels: 3x slower end to end here. Pick by the kernel's flags.
_CORETYPES = (
    ("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
    ("Haswell", {"avx2", "fma"}),
)


def openblas_coretype(cpu_flags: set[str]) -> str | None:
    """The best OpenBLAS kernel family these x86 CPU flags support, or None to let it detect."""
    for name, needed in _CORETYPES:
        if needed <= cpu_flags:
            return name
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _wheel_candidates() -> list[str]:
    """OpenBLAS shipped inside Python wheels (cmeel-openblas, scipy-openblas)."""
    found: list[str] = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        for pattern in (
            "cmeel.prefix/lib/libopenblas*.so*",
            "scipy_openblas64/lib/libscipy_openblas*.so",
            "scipy_openblas32/lib/libscipy_openblas*.so",
        ):
            found.extend(sorted(glob.glob(os.path.join(entry, pattern))))
    return found


def _candidates() -> list[str]:
    paths = [p for p in _SYSTEM_CANDIDATES if os.path.exists(p)]
    paths.extend(_wheel_candidates())
    by_name = ctypes.util.find_library("openblas")
    if by_name:
        paths.append(by_name)
    return paths


def preload_blas() -> BlasStatus:
    """Find and globally load an optimized BLAS once; safe to call many times."""
    global _status
    if _status is not None:
        return _status
    if sys.platform == "darwin":
        # MLX on macOS uses Accelerate (and Metal); nothing to do.
        _status = BlasStatus("accelerate", None, True, "macOS: MLX links Accelerate")
        return _status
    if "mlx.core" in sys.modules:
        _status = BlasStatus(
            "reference", None, False, "mlx.core was imported before inference; BLAS not preloaded"
        )
        log.warning(_status.detail)
        return _status
    requested = os.environ.get(BLAS_ENV_VAR, "").strip()
    if requested.lower() == "none":
        _status = BlasStatus("reference", None, False, f"{BLAS_ENV_VAR}=none: preloading disabled")
        return _status
    candidates = [requested] if requested else _candidates()
    # Read by OpenBLAS when it loads; a user's own setting wins.
    if "OPENBLAS_CORETYPE" not in os.environ and (coretype := openblas_coretype(_cpu_flags())):
        os.environ["OPENBLAS_CORETYPE"] = coretype
    errors: list[str] = []
    for path in candidates:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:  # e.g. cmeel-openblas without libgfortran.so.5
            errors.append(f"{path}: {exc}")
            continue
        coretype = os.environ.get("OPENBLAS_CORETYPE", "auto-detected")
        _status = BlasStatus("openblas", path, True, f"preloaded before mlx.core, core {coretype}")
        return _status
    hint = (
        "install Debian's libopenblas0-pthread (the set-up script does) "
        f"or point {BLAS_ENV_VAR} at a libopenblas.so"
    )
    detail = "; ".join(errors) if errors else "no OpenBLAS found"
    _status = BlasStatus("reference", None, False, f"{detail}; CPU matmuls will be slow: {hint}")
    log.warning("optimized BLAS not loaded: %s", _status.detail)
    return _status


def blas_status() -> BlasStatus:
    return preload_blas()


# -- thread count --------------------------------------------------------------------------------

_threads_lock = threading.Lock()
_cap_holders = 0
_uncapped_threads: int | None = None


@contextmanager
def blas_threads_capped(threads: int) -> Iterator[None]:
    """Run the body with the preloaded OpenBLAS using at most `threads` threads.

    Parallel encoder lanes each run one GEMM at a time and want one thread apiece; OpenBLAS 0.3.21
    (Debian's) has only a process-wide setting, so holders are counted: the cap holds while any
    holder is inside, is the smallest asked for, and the count from before comes back after the
    last one leaves. Calls already running keep the split they started with. No-op without a
    preloaded OpenBLAS.
    """
    global _cap_holders, _uncapped_threads
    library = _openblas()
    if library is None:
        yield
        return
    with _threads_lock:
        current = int(library.openblas_get_num_threads())
        if _cap_holders == 0:
            _uncapped_threads = current
        _cap_holders += 1
        if threads < current:
            library.openblas_set_num_threads(max(1, threads))
    try:
        yield
    finally:
        with _threads_lock:
            _cap_holders -= 1
            if _cap_holders == 0 and _uncapped_threads is not None:
                library.openblas_set_num_threads(_uncapped_threads)
                _uncapped_threads = None


def blas_threads() -> int | None:
    """The preloaded OpenBLAS's thread count now, or None without one."""
    library = _openblas()
    return None if library is None else int(library.openblas_get_num_threads())


_library: ctypes.CDLL | None = None


def _openblas() -> ctypes.CDLL | None:
    """The preloaded OpenBLAS with its thread-count functions, or None."""
    global _library
    status = preload_blas()
    if status.name != "openblas" or status.path is None:
        return None
    if _library is None:
        library = ctypes.CDLL(status.path)
        if not hasattr(library, "openblas_set_num_threads"):
            return None
        library.openblas_get_num_threads.restype = ctypes.c_int
        library.openblas_set_num_threads.argtypes = [ctypes.c_int]
        _library = library
    return _library
