"""The optimized BLAS is found and preloaded before mlx, or skipped with a clear reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPORT = (
    "import json, inference, dataclasses; from inference.blas import blas_status;"
    "print(json.dumps(dataclasses.asdict(blas_status())))"
)


def _status_with(env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop("RAG_BLAS_LIBRARY", None)
    if env_value is not None:
        env["RAG_BLAS_LIBRARY"] = env_value
    out = subprocess.run([sys.executable, "-c", REPORT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disabled_by_env_reports_reference_blas() -> None:
    status = _status_with("none")
    assert status["name"] == "reference" and not status["optimized"]


def test_missing_library_falls_back_with_reason() -> None:
    status = _status_with("/nonexistent/libopenblas.so.0")
    assert not status["optimized"]
    assert "/nonexistent/libopenblas.so.0" in status["detail"]


def test_mlx_imported_first_is_reported() -> None:
    code = "import mlx.core; " + REPORT
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert not status["optimized"] and "imported before" in status["detail"]


def test_default_discovery_loads_openblas_when_installed() -> None:
    from inference.blas import _candidates

    status = _status_with(None)
    if not _candidates():
        assert not status["optimized"] and "no OpenBLAS found" in status["detail"]
    else:
        assert status["optimized"] and status["name"] == "openblas"


def test_coretype_follows_cpu_flags() -> None:
    from inference.blas import openblas_coretype

    avx512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "sse3"}
    assert openblas_coretype(avx512) == "SkylakeX"
    assert openblas_coretype({"avx2", "fma", "sse3"}) == "Haswell"
    assert openblas_coretype({"avx512f", "avx2", "sse3"}) is None  # partial AVX-512, no FMA
    assert openblas_coretype(set()) is None


def test_users_coretype_setting_wins() -> None:
    code = "import os, inference; print(os.environ['OPENBLAS_CORETYPE'])"
    env = {**os.environ, "OPENBLAS_CORETYPE": "Prescott"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "Prescott"
