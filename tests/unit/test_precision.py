"""Importing the inference core turns MLX's TF32 off before MLX runs, unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys

from inference.precision import TF32_ENV_VAR

REPORT = f"import inference, os; print(os.environ[{TF32_ENV_VAR!r}])"


def _setting_after_import(user_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != TF32_ENV_VAR}
    if user_value is not None:
        env[TF32_ENV_VAR] = user_value
    out = subprocess.run([sys.executable, "-c", REPORT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_tf32_is_off_by_default() -> None:
    assert _setting_after_import(None) == "0"


def test_a_users_choice_is_kept() -> None:
    assert _setting_after_import("1") == "1"
