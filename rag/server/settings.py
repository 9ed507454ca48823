"""The server's settings: where it listens and what it lets in. `rag serve` flags mirror them."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"  # local only unless the user asks for more
DEFAULT_PORT = 8000
MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = ()  # empty: no authentication (fine on 127.0.0.1)
    cors_origins: tuple[str, ...] = ()  # empty: CORS off
    max_request_bytes: int = 4 * MiB  # JSON bodies
    max_upload_bytes: int = 64 * MiB  # document uploads
    max_embedding_inputs: int = 2048  # OpenAI's limit per request
    max_rerank_documents: int = 1000  # Cohere's limit per request

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if any(not key or key != key.strip() for key in self.api_keys):
            raise ValueError("API keys must be non-empty and have no surrounding whitespace")
        for name in (
            "max_request_bytes",
            "max_upload_bytes",
            "max_embedding_inputs",
            "max_rerank_documents",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
