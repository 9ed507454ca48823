"""Find the files to ingest under the given folders: supported types, sorted, stat'ed once.

Knows nothing about the index. Hidden files and folders are skipped unless asked for; version
control folders always are. Folder symlinks are not followed (no cycles); file symlinks are.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ingest.errors import IngestError
from ingest.loaders import Loader, loader_for
from ingest.report import FileFailure

_NEVER_READ = frozenset({".git", ".hg", ".svn"})
_NO_SUFFIX = "(none)"


@dataclass(frozen=True)
class SourceFile:
    path: str  # absolute
    size: int
    mtime_ns: int
    loader: Loader


@dataclass
class ScanResult:
    roots: list[str]  # absolute, as given (resolved)
    files: list[SourceFile] = field(default_factory=list)
    skipped_by_suffix: Counter[str] = field(default_factory=Counter)
    failures: list[FileFailure] = field(default_factory=list)
    unreadable_dirs: list[str] = field(default_factory=list)  # their documents are not pruned


def _suffix(name: str) -> str:
    return Path(name).suffix.lower() or _NO_SUFFIX


def scan_roots(roots: Sequence[Path | str], *, include_hidden: bool = False) -> ScanResult:
    """Every supported file under `roots` (folders or single files), deduplicated and sorted."""
    resolved = []
    for root in roots:
        path = Path(root).expanduser().resolve()
        if not path.exists():
            raise IngestError(f"no such file or folder: {root}")
        resolved.append(str(path))
    result = ScanResult(roots=resolved)
    seen: set[str] = set()

    def add(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        loader = loader_for(path)
        if loader is None:
            result.skipped_by_suffix[_suffix(path)] += 1
            return
        try:
            stat = os.stat(path)
        except OSError as exc:
            result.failures.append(FileFailure(path, f"cannot read: {exc.strerror or exc}"))
            return
        result.files.append(SourceFile(path, stat.st_size, stat.st_mtime_ns, loader))

    def on_error(exc: OSError) -> None:
        where = str(exc.filename)
        result.unreadable_dirs.append(where)
        result.failures.append(FileFailure(where, f"cannot list folder: {exc.strerror}"))

    for root in resolved:
        if os.path.isfile(root):
            add(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
            dirnames[:] = sorted(
                name
                for name in dirnames
                if name not in _NEVER_READ and (include_hidden or not name.startswith("."))
            )
            for name in sorted(filenames):
                if include_hidden or not name.startswith("."):
                    add(os.path.join(dirpath, name))
    result.files.sort(key=lambda source: source.path)
    return result
