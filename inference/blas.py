"""Load an optimized BLAS before MLX so its CPU matmuls stop using the bundled reference BLAS.

The `mlx[cpu]` Linux wheel links a reference BLAS (about 4 GFLOP/s for fp32 1024^3 on 2 cores);
loading OpenBLAS with RTLD_GLOBAL before `import mlx.core` makes the dynamic linker resolve the
cblas symbols from it instead (about 14x faster). This module must run before mlx is imported,
so it imports nothing heavy and never imports mlx itself.

On an Intel CPU, Intel MKL from the `mkl` wheel (the `mkl` extra) is preferred when installed:
decoding multiplies 1-4 rows by each weight matrix, where OpenBLAS 0.3.21 packs the whole
matrix per call and MKL streams it (SmolLM2-135M's 120 layer GEMMs, 424 MB of fp32 weights:
47 -> 21 ms at 1 row, 66 -> 28 ms at 3 rows, on 2 cores).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

BLAS_ENV_VAR = "RAG_BLAS_LIBRARY"  # a path to a libopenblas-like .so, or "none" to skip
# mkl_set_threading_layer values: Intel's OpenMP ships beside the `mkl` wheel; GNU's is a fallback.
_MKL_THREADING = (("libiomp5.so", 0), ("libgomp.so.1", 3))
_MKL_SEQUENTIAL = 1
MKL_HINT = "Intel MKL decodes ~1.4x faster on this CPU: the mkl extra (setup.sh installs it)"

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

    name: str  # "openblas", "mkl", "accelerate" or "reference"
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


def _cpuinfo_field(name: str) -> str:
    """The first value of a /proc/cpuinfo field ('' when there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set[str]:
    return set(_cpuinfo_field("flags").split())


def _intel_cpu() -> bool:
    return _cpuinfo_field("vendor_id") == "GenuineIntel"


def _mkl_candidates() -> list[str]:
    """MKL's single dynamic library from the `mkl` wheel, on Intel CPUs only (elsewhere its
    generic kernels are no better than OpenBLAS's)."""
    if not _intel_cpu():
        return []
    found: list[str] = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found.extend(sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so.*")))[-1:])
    return found


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
    paths = _mkl_candidates()
    paths.extend(p for p in _SYSTEM_CANDIDATES if os.path.exists(p))
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
            library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:  # e.g. cmeel-openblas without libgfortran.so.5
            errors.append(f"{path}: {exc}")
            continue
        if hasattr(library, "MKL_Set_Threading_Layer"):
            _status = BlasStatus(
                "mkl", path, True, f"preloaded before mlx.core, {_init_mkl(library, path)}"
            )
            return _status
        coretype = os.environ.get("OPENBLAS_CORETYPE", "auto-detected")
        detail = f"preloaded before mlx.core, core {coretype}"
        if not requested and _intel_cpu():
            detail += f"; {MKL_HINT}"  # MKL would have been found first
        _status = BlasStatus("openblas", path, True, detail)
        return _status
    hint = (
        "install Debian's libopenblas0-pthread (the set-up script does) "
        f"or point {BLAS_ENV_VAR} at a libopenblas.so"
    )
    detail = "; ".join(errors) if errors else "no OpenBLAS found"
    _status = BlasStatus("reference", None, False, f"{detail}; CPU matmuls will be slow: {hint}")
    log.warning("optimized BLAS not loaded: %s", _status.detail)
    return _status


def _init_mkl(library: ctypes.CDLL, path: str) -> str:
    """Pick MKL's threading layer before its first call (a layer it cannot load is a fatal
    error inside MKL, not an exception) and describe the library."""
    layer = os.environ.get("MKL_THREADING_LAYER")
    if not layer:
        layer_id, layer = _MKL_SEQUENTIAL, "sequential"
        for runtime, candidate_id in _MKL_THREADING:
            try:
                ctypes.CDLL(os.path.join(os.path.dirname(path), runtime))
            except OSError:
                try:
                    ctypes.CDLL(runtime)
                except OSError:
                    continue
            layer_id, layer = candidate_id, runtime
            break
        library.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
        library.MKL_Set_Threading_Layer(layer_id)
    version = ctypes.create_string_buffer(256)
    library.MKL_Get_Version_String(version, len(version))
    return f"{version.value.decode(errors='replace').strip()}, threading {layer}"


def blas_status() -> BlasStatus:
    return preload_blas()


# -- thread count --------------------------------------------------------------------------------

_threads_lock = threading.Lock()
_cap_holders = 0
_uncapped_threads: int | None = None


@contextmanager
def blas_threads_capped(threads: int) -> Iterator[None]:
    """Run the body with the preloaded BLAS using at most `threads` threads.

    Parallel encoder lanes each run one GEMM at a time and want one thread apiece; OpenBLAS 0.3.21
    (Debian's) has only a process-wide setting, so holders are counted: the cap holds while any
    holder is inside, is the smallest asked for, and the count from before comes back after the
    last one leaves. Calls already running keep the split they started with. MKL takes the same
    process-wide setting. No-op without a preloaded OpenBLAS or MKL.
    """
    global _cap_holders, _uncapped_threads
    control = _thread_control()
    if control is None:
        yield
        return
    with _threads_lock:
        current = control.get()
        if _cap_holders == 0:
            _uncapped_threads = current
        _cap_holders += 1
        if threads < current:
            control.set(max(1, threads))
    try:
        yield
    finally:
        with _threads_lock:
            _cap_holders -= 1
            if _cap_holders == 0 and _uncapped_threads is not None:
                control.set(_uncapped_threads)
                _uncapped_threads = None


def blas_threads() -> int | None:
    """The preloaded BLAS's thread count now, or None without OpenBLAS or MKL."""
    control = _thread_control()
    return None if control is None else control.get()


@dataclass(frozen=True)
class _ThreadControl:
    get: Callable[[], int]
    set: Callable[[int], None]


_control: _ThreadControl | None = None

# (getter, setter) symbol names per library.
_THREAD_SYMBOLS = {
    "openblas": ("openblas_get_num_threads", "openblas_set_num_threads"),
    "mkl": ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
}


def _thread_control() -> _ThreadControl | None:
    """The preloaded library's thread-count functions, or None."""
    global _control
    status = preload_blas()
    if status.name not in _THREAD_SYMBOLS or status.path is None:
        return None
    if _control is None:
        library = ctypes.CDLL(status.path)
        getter_name, setter_name = _THREAD_SYMBOLS[status.name]
        if not hasattr(library, setter_name):
            return None
        getter, setter = getattr(library, getter_name), getattr(library, setter_name)
        getter.restype = ctypes.c_int
        setter.argtypes = [ctypes.c_int]
        _control = _ThreadControl(lambda: int(getter()), setter)
    return _control
