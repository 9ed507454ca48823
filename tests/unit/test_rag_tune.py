"""`rag tune` on a tiny llama with a sidecar head: it measures every mode, writes the chosen depth
to the model's settings, and the engine applies them at start-up."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.engine import Engine, EngineConfig
from inference.model_settings import (
    ModelSettings,
    model_key,
    read_model_settings,
    settings_path,
    write_model_settings,
)
from inference.mtp_head import describe_head, make_generic_head, save_head, sidecar_path

import mlx.core as mx
import pytest
from mlx_lm import load

from rag.cli import main
from rag.tune_cli import best_depth
from tests.fixtures.tiny_llama import write_tiny_llama


@pytest.fixture(scope="module")
def headed_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = write_tiny_llama(tmp_path_factory.mktemp("tune") / "llama")
    model, _ = load(str(folder))
    mx.random.seed(0)
    save_head(make_generic_head(model), sidecar_path(folder))
    yield folder
    # The data dir is shared by the session: other tests' copies of this model are untuned.
    settings_path(fingerprint(folder)).unlink(missing_ok=True)


def fingerprint(folder: Path) -> str:
    return model_key(folder, load(str(folder))[0])


def test_best_depth_needs_a_margin_over_plain() -> None:
    results = {m: {"decode_tok_s": r} for m, r in {"ar": 10, "d1": 10.2, "d2": 9, "d3": 8}.items()}
    assert best_depth(results, margin=0.03) == 0
    results["d2"]["decode_tok_s"] = 12
    assert best_depth(results, margin=0.03) == 2


def test_settings_round_trip_and_bad_files(tmp_path: Path) -> None:
    assert read_model_settings("nothing-here") is None
    path = write_model_settings("abc", ModelSettings(2, {"device": "cpu"}))
    assert path == settings_path("abc") and read_model_settings("abc") == ModelSettings(
        2, {"device": "cpu"}
    )
    path.write_text("{not json")
    assert read_model_settings("abc") is None  # logged and ignored, never fatal
    with pytest.raises(ValueError, match="mtp_depth"):
        ModelSettings(4)


def test_tune_writes_the_depth_the_engine_then_uses(headed_llama: Path, capsys) -> None:
    args = ["tune", "--model", str(headed_llama), "--prompts", "1", "--tokens", "6"]
    assert main([*args, "--repeats", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["mode"] for line in lines[:4]] == ["ar", "d1", "d2", "d3"]
    summary = lines[-1]
    settings = read_model_settings(fingerprint(headed_llama))
    assert settings is not None and settings.mtp_depth == summary["mtp_depth"]
    assert summary["written"] == str(settings_path(fingerprint(headed_llama)))
    assert set(settings.measured["decode_tok_s"]) == {"ar", "d1", "d2", "d3"}


@pytest.mark.parametrize("depth", [0, 2])
def test_engine_applies_tuned_depth(headed_llama: Path, depth: int) -> None:
    write_model_settings(fingerprint(headed_llama), ModelSettings(depth))
    with Engine.from_path(headed_llama) as engine:
        lane = engine.mtp_lane
        if depth == 0:
            assert lane is None
        else:
            assert lane is not None and lane.policy.fixed_depth == depth
    # An explicit setting wins over the tuned one.
    with Engine.from_path(headed_llama, config=EngineConfig(mtp_tuned=False)) as engine:
        assert engine.mtp_lane is not None and engine.mtp_lane.policy.fixed_depth is None


def test_tune_without_a_head_is_an_error(tmp_path: Path, capsys) -> None:
    folder = write_tiny_llama(tmp_path / "bare")
    assert main(["tune", "--model", str(folder)]) == 1
    assert "no MTP head" in capsys.readouterr().out


def test_describe_head_names_the_head_without_loading_the_model(
    headed_llama: Path, tmp_path: Path
) -> None:
    assert describe_head(headed_llama) == "sidecar mtp_head.safetensors"
    assert describe_head(write_tiny_llama(tmp_path / "bare")) is None
