"""The optimized BLAS is found and preloaded before mlx, or skipped with a clear reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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


def test_default_discovery_prefers_mkl_then_openblas() -> None:
    from inference.blas import _candidates, _mkl_candidates

    status = _status_with(None)
    if not _candidates():
        assert not status["optimized"] and "no OpenBLAS found" in status["detail"]
    elif _mkl_candidates():
        assert status["optimized"] and status["name"] == "mkl" and "threading" in status["detail"]
    else:
        assert status["optimized"] and status["name"] == "openblas"
        from inference.blas import MKL_HINT, _cpuinfo_field

        # On an Intel CPU without MKL, `rag doctor` says what would be faster.
        assert (MKL_HINT in status["detail"]) == (_cpuinfo_field("vendor_id") == "GenuineIntel")


def test_an_openblas_path_loads_openblas_with_its_thread_control() -> None:
    from inference.blas import _SYSTEM_CANDIDATES

    path = next((p for p in _SYSTEM_CANDIDATES if os.path.exists(p)), None)
    if path is None:
        pytest.skip("no system OpenBLAS")
    code = (
        "import inference; from inference.blas import blas_status, blas_threads, "
        "blas_threads_capped as cap\n"
        "with cap(1): inside = blas_threads()\n"
        "print(blas_status().name, inside)"
    )
    env = {**os.environ, "RAG_BLAS_LIBRARY": path}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["openblas", "1"], out.stderr


def test_mkl_keeps_the_users_threading_layer_and_its_thread_control() -> None:
    from inference.blas import _mkl_candidates

    if not _mkl_candidates():
        pytest.skip("no MKL wheel installed on an Intel CPU")
    code = (
        "import inference; from inference.blas import blas_status, blas_threads, "
        "blas_threads_capped as cap\n"
        "with cap(1): inside = blas_threads()\n"
        "import mlx.core as mx; a = mx.ones((64, 64)); assert (a @ a)[0, 0].item() == 64\n"
        "print(blas_status().detail.rsplit(' ', 1)[-1], inside)"
    )
    env = {**os.environ, "MKL_THREADING_LAYER": "SEQUENTIAL"}
    env.pop("RAG_BLAS_LIBRARY", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["SEQUENTIAL", "1"], out.stderr


def test_mkl_is_taken_only_on_intel_cpus(monkeypatch, tmp_path) -> None:
    from inference import blas

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libmkl_rt.so.2").touch()
    monkeypatch.setattr(blas.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(blas.sys, "base_prefix", str(tmp_path))
    vendor = {"vendor_id": "GenuineIntel"}
    monkeypatch.setattr(blas, "_cpuinfo_field", lambda name: vendor.get(name, ""))
    assert blas._mkl_candidates() == [str(tmp_path / "lib" / "libmkl_rt.so.2")]
    vendor["vendor_id"] = "AuthenticAMD"
    assert blas._mkl_candidates() == []


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
