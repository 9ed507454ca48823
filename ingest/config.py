"""Settings of one ingest run, validated once; `ingest --help` mirrors these fields one to one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inference.paths import data_dir

DB_FILENAME = "index.sqlite3"
# Bump when chunking output changes for the same settings: every stored file is re-chunked.
CHUNKER_VERSION = 1


def default_db_path() -> Path:
    """$RAG_DATA_DIR/index.sqlite3 (see `inference.paths.data_dir`)."""
    return data_dir() / DB_FILENAME


@dataclass(frozen=True)
class IngestConfig:
    chunk_tokens: int = 256  # content tokens per chunk, capped at what the model takes
    chunk_overlap: int = 32  # tokens shared by consecutive chunks of a section
    prune: bool = True  # remove documents whose files are gone from the given folders
    reembed: bool = False  # the index was built with another model: empty it and start over
    check_hashes: bool = False  # hash files even when size and mtime are unchanged
    include_hidden: bool = False  # also read dot-files and dot-folders (.git is never read)
    max_file_mb: float = 100.0  # larger files are reported as failed, not read
    batch_size: int = 64  # chunks per call to the embedder

    def __post_init__(self) -> None:
        if self.chunk_tokens < 16:
            raise ValueError(f"chunk_tokens must be at least 16, got {self.chunk_tokens}")
        if not 0 <= self.chunk_overlap <= self.chunk_tokens // 2:
            raise ValueError(
                f"chunk_overlap must be between 0 and chunk_tokens / 2 ({self.chunk_tokens // 2}),"
                f" got {self.chunk_overlap}"
            )
        if self.max_file_mb <= 0:
            raise ValueError(f"max_file_mb must be positive, got {self.max_file_mb}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)

    def signature(self, loader_name: str, loader_version: int) -> str:
        """Stored per document: a change of loader or chunking settings re-chunks the file."""
        return (
            f"{loader_name}/{loader_version};chunker/{CHUNKER_VERSION};"
            f"tokens={self.chunk_tokens};overlap={self.chunk_overlap}"
        )
