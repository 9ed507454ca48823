"""A file written so that a crash (kill -9, power) leaves either the old state or the whole file.

    temp file beside it -> write -> fsync -> rename over the name -> fsync the folder

A crash leaves at worst a `*.tmp` file, which the owner deletes when it starts.
Ignores: what the bytes are (kv_ssd_format.py), which files exist (kv_ssd.py, head_prefix_ssd.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def write_durably(path: Path, parts: Iterable[bytes | memoryview]) -> None:
    temp = path.with_name(f"{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    with temp.open("wb") as file:
        for part in parts:
            file.write(part)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
