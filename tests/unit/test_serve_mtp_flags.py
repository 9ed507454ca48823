"""`rag serve --mtp ...` flags become the EngineConfig fields of the MTP lane."""

from __future__ import annotations

import pytest

from rag.cli import build_parser
from rag.serve import load_options_from


def _engine(*flags: str):
    return load_options_from(build_parser().parse_args(["serve", *flags])).engine


def test_default_is_the_tuned_depth_else_adaptive() -> None:
    engine = _engine()
    assert (engine.mtp, engine.mtp_depth, engine.mtp_tuned, engine.mtp_max_requests) == (
        True,
        None,
        True,
        1,
    )


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("off", (False, None, True)),
        ("adaptive", (True, None, False)),
        ("auto", (True, None, True)),
        ("1", (True, 1, False)),
        ("3", (True, 3, False)),
    ],
)
def test_mtp_mode(mode: str, expected: tuple) -> None:
    engine = _engine("--mtp", mode)
    assert (engine.mtp, engine.mtp_depth, engine.mtp_tuned) == expected


def test_max_requests_flag() -> None:
    assert _engine("--mtp-max-requests", "4").mtp_max_requests == 4


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="mtp_max_requests"):
        _engine("--mtp-max-requests", "0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--mtp", "4"])
