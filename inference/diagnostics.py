"""What the inference runtime is running on: versions, device, BLAS and its measured speed."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from importlib import metadata

from inference.blas import BlasStatus, blas_status

import mlx.core as mx


@dataclass(frozen=True)
class RuntimeReport:
    python: str
    mlx: str
    mlx_lm: str
    device: str  # "cpu", "gpu (metal)", "gpu (cuda)"
    blas: BlasStatus
    matmul_gflops: float  # fp32 on the CPU, the path BLAS serves


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_name() -> str:
    if mx.metal.is_available():
        return "gpu (metal)"
    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        return "gpu (cuda)"
    return "cpu"


def measure_cpu_matmul_gflops(size: int = 512, repeats: int = 5) -> float:
    """fp32 size^3 matmul throughput on the CPU stream, median of `repeats` after a warm-up."""
    with mx.stream(mx.cpu):
        a = mx.random.normal((size, size))
        b = mx.random.normal((size, size))
        mx.eval(a @ b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(a @ b)
            times.append(time.perf_counter() - start)
    times.sort()
    return 2 * size**3 / times[len(times) // 2] / 1e9


def runtime_report() -> RuntimeReport:
    return RuntimeReport(
        python=platform.python_version(),
        mlx=_version("mlx"),
        mlx_lm=_version("mlx-lm"),
        device=device_name(),
        blas=blas_status(),
        matmul_gflops=measure_cpu_matmul_gflops(),
    )
