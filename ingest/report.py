"""What an ingest run did: counts per outcome, failures with reasons, timings; as text or JSON."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class FileFailure:
    path: str
    reason: str


@dataclass
class IngestReport:
    db_path: str
    roots: list[str]
    num_files: int = 0  # files of a supported type found under the roots
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0  # documents whose files are gone (with prune)
    failures: list[FileFailure] = field(default_factory=list)
    skipped_by_suffix: Counter[str] = field(default_factory=Counter)  # unsupported types
    num_chunks: int = 0  # chunks embedded and written by this run
    num_tokens: int = 0
    num_truncated: int = 0  # chunks the embedder had to cut (should stay 0)
    embedder: str | None = None  # None: no file needed embedding, the model was not loaded
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_suffix.values())

    @property
    def ok(self) -> bool:
        return not self.failures and not self.interrupted

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped_by_suffix"] = dict(sorted(self.skipped_by_suffix.items()))
        data.update(failed=self.failed, skipped=self.skipped, ok=self.ok)
        data["seconds"] = round(self.seconds, 3)
        return data

    def summary_line(self) -> str:
        rate = self.num_chunks / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.added} added, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.removed} removed, {self.failed} failed, {self.skipped} skipped "
            f"(unsupported type); {self.num_chunks} chunks in {self.seconds:.1f} s "
            f"({rate:.1f} chunks/s)"
        )
