"""`rag serve --upstream ...` flags become the LoadOptions that route generation remotely."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag.cli import build_parser
from rag.serve import load_options_from
from rag.upstreams.config import RouterConfig, UpstreamSpec


def test_upstream_flags_become_load_options(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--upstream",
            "http://10.0.0.1:8000/v1,model=llama,key=sk-a",
            "--upstream",
            "http://10.0.0.2:8000",
            "--upstream-policy",
            "round_robin",
            "--upstream-tokenizer",
            str(tmp_path),
            "--upstream-affinity-tokens",
            "128",
            "--upstream-max-model-len",
            "8192",
        ]
    )
    options = load_options_from(args)
    assert options.upstreams == (
        UpstreamSpec("http://10.0.0.1:8000", "llama", "sk-a"),
        UpstreamSpec("http://10.0.0.2:8000"),
    )
    assert options.router == RouterConfig(
        policy="round_robin", affinity_tokens=128, max_model_len=8192
    )
    assert options.upstream_tokenizer == tmp_path


def test_no_upstream_means_the_local_engine() -> None:
    options = load_options_from(build_parser().parse_args(["serve"]))
    assert options.upstreams == () and options.router == RouterConfig()
    assert options.embedder_url is None and options.reranker_url is None


def test_embedder_and_reranker_urls_become_load_options() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--embedder-url",
            "http://10.0.0.3:8000/v1,model=bge-small",
            "--reranker-url",
            "https://rerank.example:443,key=sk-r",
        ]
    )
    options = load_options_from(args)
    assert options.embedder_url == UpstreamSpec("http://10.0.0.3:8000", "bge-small")
    assert options.reranker_url == UpstreamSpec("https://rerank.example:443", api_key="sk-r")


def test_a_bad_upstream_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--upstream", "10.0.0.1:8000"])
    assert "upstream URL must be http(s)" in capsys.readouterr().err
