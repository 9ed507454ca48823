"""An upstream's health state machine: out at the first failure, back at the first good probe."""

from __future__ import annotations

import pytest

from rag.upstreams.config import RouterConfig, UpstreamSpec, parse_upstream
from rag.upstreams.health import HealthPolicy, UpstreamHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_health() -> tuple[UpstreamHealth, Clock]:
    clock = Clock()
    return UpstreamHealth(HealthPolicy(2.0, 1.0, 5.0), clock=clock), clock


def test_up_and_probed_every_interval() -> None:
    health, clock = make_health()
    assert health.up and health.check_due()
    health.record_check(True)
    assert not health.check_due()
    clock.now += 2.0
    assert health.check_due()


def test_a_failure_takes_it_out_and_probes_back_off_to_the_cap() -> None:
    health, clock = make_health()
    health.record_failure("connection refused")
    assert not health.up and health.last_error == "connection refused"
    delays = []
    for _ in range(5):
        delays.append(health.next_check_at - clock.now)
        clock.now = health.next_check_at
        assert health.check_due()
        health.record_check(False, "still down")
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert not health.up and health.num_failures == 6


def test_a_good_probe_brings_it_back_and_resets_the_backoff() -> None:
    health, clock = make_health()
    health.record_failure("x")
    health.record_failure("y")
    clock.now = health.next_check_at
    health.record_check(True)
    assert health.up and health.num_failures == 0
    assert health.next_check_at == clock.now + 2.0
    health.record_failure("z")
    assert health.next_check_at == clock.now + 1.0  # the backoff starts over


def test_parse_upstream() -> None:
    spec = parse_upstream("http://10.0.0.5:8000/v1/,model=llama,key=sk-1")
    assert spec == UpstreamSpec("http://10.0.0.5:8000", "llama", "sk-1")
    assert spec.name == "10.0.0.5:8000"
    assert parse_upstream("https://a.example").model is None


def test_parse_upstream_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-env")
    assert parse_upstream("http://h:1,key_env=UPSTREAM_KEY").api_key == "sk-env"
    with pytest.raises(ValueError, match="EMPTY_VAR is empty"):
        parse_upstream("http://h:1,key_env=EMPTY_VAR")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("localhost:8000", "http"),
        ("http://h:1,model", "name=value"),
        ("http://h:1,weight=2", "unknown upstream option"),
    ],
)
def test_parse_upstream_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_upstream(text)


def test_router_config_checks() -> None:
    with pytest.raises(ValueError, match="policy"):
        RouterConfig(policy="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="load_factor"):
        RouterConfig(load_factor=0.5)
    with pytest.raises(ValueError, match="max_attempts"):
        RouterConfig(max_attempts=0)
