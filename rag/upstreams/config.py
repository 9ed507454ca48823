"""What `rag serve --upstream` configures: the upstreams and how requests are routed to them.

    --upstream URL[,model=NAME][,key=KEY][,key_env=VAR]   -> UpstreamSpec
    --upstream-policy, --upstream-affinity-tokens, ...     -> RouterConfig

`key_env=VAR` reads the key from the environment, which keeps it out of `ps` output.

Ignores: HTTP, tokenization, and what the upstreams run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

RoutingPolicy = Literal["affinity", "round_robin"]
ROUTING_POLICIES: tuple[str, ...] = ("affinity", "round_robin")


@dataclass(frozen=True)
class UpstreamSpec:
    """One OpenAI-compatible server: its base URL (without /v1), model name and API key."""

    url: str
    model: str | None = None  # None: the first chat model its /v1/models lists
    api_key: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"upstream URL must be http(s)://host[:port], got {self.url!r}")
        url = self.url.rstrip("/")
        # Users paste OpenAI base URLs; routes are added to the server's root.
        url = url.removesuffix("/v1")
        object.__setattr__(self, "url", url)

    @property
    def name(self) -> str:
        """How metrics and errors name it: host:port (never the key)."""
        return urlsplit(self.url).netloc


def parse_upstream(text: str) -> UpstreamSpec:
    """`URL[,model=NAME][,key=KEY][,key_env=VAR]` -> UpstreamSpec; ValueError says what is wrong."""
    url, *options = [part.strip() for part in text.split(",")]
    fields: dict[str, str] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or not value:
            raise ValueError(f"upstream option must be name=value, got {option!r} in {text!r}")
        if name not in ("model", "key", "key_env"):
            raise ValueError(f"unknown upstream option {name!r}; known: model, key, key_env")
        fields[name] = value
    key = fields.get("key")
    if "key_env" in fields:
        key = os.environ.get(fields["key_env"])
        if not key:
            raise ValueError(f"upstream {url}: environment variable {fields['key_env']} is empty")
    return UpstreamSpec(url, model=fields.get("model"), api_key=key)


@dataclass(frozen=True)
class RouterConfig:
    """How one model's requests are spread over its upstreams; `rag serve` flags mirror it."""

    policy: RoutingPolicy = "affinity"
    affinity_tokens: int = 256  # prompts sharing their first N tokens go to the same upstream
    virtual_nodes: int = 64  # points per upstream on the hash ring: more is a more even spread
    load_factor: float = 1.25  # leave the affinity target above factor x mean in-flight + slack
    load_slack: int = 2
    max_attempts: int = 3  # upstreams tried for one request before its first token
    retry_backoff_s: float = 0.1  # before attempt 2; doubles each attempt
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 300.0  # the longest silence between two chunks (a long queue + prefill)
    health_interval_s: float = 2.0  # /health of an upstream in service
    probe_backoff_s: float = 1.0  # first re-probe of an upstream taken out; doubles per failure
    probe_backoff_max_s: float = 30.0
    max_model_len: int | None = None  # None: what the upstreams report, else the tokenizer's config

    def __post_init__(self) -> None:
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(ROUTING_POLICIES)}")
        for name in ("affinity_tokens", "virtual_nodes", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.load_factor < 1 or self.load_slack < 0:
            raise ValueError("load_factor must be >= 1 and load_slack >= 0")
        for name in (
            "retry_backoff_s",
            "connect_timeout_s",
            "read_timeout_s",
            "health_interval_s",
            "probe_backoff_s",
            "probe_backoff_max_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
