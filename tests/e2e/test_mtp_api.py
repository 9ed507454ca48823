"""The MTP lane through the HTTP API: a tiny llama with a sidecar draft head behind a real server.

`generation_mode` picks the lane per request (OpenAI and Anthropic bodies); usage reports the lane,
the depth and the drafts' fate (OpenAI's accepted/rejected prediction tokens, plus `speculation`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import inference  # noqa: F401  (loads the BLAS before mlx)
from inference.engine import EngineConfig
from inference.mtp_head import make_generic_head, save_head, sidecar_path

import httpx
import mlx.core as mx
import openai
import pytest
from mlx_lm import load

from tests.fixtures.live_server import (
    TINY_MODEL,
    TinyServer,
    make_tiny_services,
    tiny_server_running,
)
from tests.fixtures.tiny_llama import write_tiny_llama

MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyServer]:
    folder = write_tiny_llama(tmp_path_factory.mktemp("mtp_api") / "llama")
    model, _ = load(str(folder))
    mx.random.seed(0)
    save_head(make_generic_head(model), sidecar_path(folder))
    services = make_tiny_services(folder, engine_config=EngineConfig(max_num_seqs=4, mtp_depth=2))
    with tiny_server_running(services) as running:
        yield running


@pytest.fixture
def client(server: TinyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


def chat(client: openai.OpenAI, **extra):
    return client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_tokens=12, temperature=0, extra_body=extra
    )


def test_lone_request_speculates_and_reports_it(client: openai.OpenAI) -> None:
    response = chat(client)
    usage = response.usage
    assert usage is not None
    speculation = usage.model_extra["speculation"]
    assert speculation["lane"] == "mtp" and speculation["max_depth"] == 2
    assert speculation["cycles"] > 0
    assert speculation["mtp_tokens"] + speculation["batch_tokens"] == usage.completion_tokens
    details = usage.completion_tokens_details
    assert details is not None
    accepted = sum(speculation["accepted_by_depth"])
    assert details.accepted_prediction_tokens == accepted
    assert details.rejected_prediction_tokens == speculation["drafted_tokens"] - accepted


def test_ar_mode_is_plain_decoding_with_the_same_greedy_text(client: openai.OpenAI) -> None:
    lane = chat(client)
    plain = chat(client, generation_mode="ar")
    assert plain.usage is not None and plain.usage.model_extra["speculation"]["lane"] == "ar"
    assert plain.usage.model_extra["speculation"]["cycles"] == 0
    assert plain.choices[0].message.content == lane.choices[0].message.content


def test_streamed_usage_carries_the_lane(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=TINY_MODEL,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usages) == 1 and usages[0].model_extra["speculation"]["lane"] == "mtp"


def test_bad_generation_mode_is_a_400(server: TinyServer) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": TINY_MODEL, "messages": MESSAGES, "generation_mode": "turbo"},
    )
    assert response.status_code == 400
    assert "generation_mode" in response.json()["error"]["message"]


def test_anthropic_messages_take_the_mode(server: TinyServer) -> None:
    body = {
        "model": TINY_MODEL,
        "max_tokens": 6,
        "messages": MESSAGES,
        "temperature": 0,
        "generation_mode": "ar",
    }
    response = httpx.post(f"{server.base_url}/v1/messages", json=body)
    assert response.status_code == 200, response.text
    bad = httpx.post(f"{server.base_url}/v1/messages", json=body | {"generation_mode": "x"})
    assert bad.status_code == 400 and bad.json()["type"] == "error"


def test_sidecar_head_path_is_used(server: TinyServer) -> None:
    engine = server.services.models.get(None)
    assert getattr(engine, "mtp_lane", None) is not None


def test_folder_without_head_has_no_speculation_block(tmp_path: Path) -> None:
    folder = write_tiny_llama(tmp_path / "plain")
    with tiny_server_running(make_tiny_services(folder)) as running:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="none", max_retries=0)
        usage = chat(client).usage
        assert usage is not None and "speculation" not in (usage.model_extra or {})


def test_metrics_count_lane_tokens_and_accepted_drafts(server: TinyServer, client) -> None:
    chat(client)
    text = httpx.get(f"{server.base_url}/metrics").text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rag_") and not line.startswith("#")
    }
    assert values[f'rag_decoded_tokens_total{{lane="mtp",model="{TINY_MODEL}"}}'] > 0
    assert values[f'rag_mtp_cycles_total{{model="{TINY_MODEL}"}}'] > 0
    drafted = values[f'rag_mtp_drafted_tokens_total{{model="{TINY_MODEL}"}}']
    accepted = sum(
        values.get(f'rag_mtp_accepted_drafts_total{{depth="{d}",model="{TINY_MODEL}"}}', 0)
        for d in (1, 2, 3)
    )
    assert drafted > 0 and 0 <= accepted <= drafted
