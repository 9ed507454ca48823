"""Pick the SQLite driver: the standard `sqlite3` module when it can load extensions, else pysqlite3.

Many Linux Pythons (and macOS's system Python) are built without loadable-extension support, so
`sqlite3.Connection.enable_load_extension` is missing and sqlite-vec cannot be loaded. pysqlite3
(`pysqlite3-binary` on PyPI) is a DB-API drop-in with its own, newer SQLite. This module knows
nothing about the schema or about sqlite-vec; the store passes the extension's path in.
"""

from __future__ import annotations

import sqlite3 as _stdlib_sqlite3
from pathlib import Path
from types import ModuleType
from typing import Any

from ingest.errors import StoreError


def _choose_driver() -> ModuleType:
    if hasattr(_stdlib_sqlite3.Connection, "enable_load_extension"):
        return _stdlib_sqlite3
    try:
        import pysqlite3.dbapi2 as pysqlite3  # type: ignore[import-not-found]
    except ImportError:
        return _stdlib_sqlite3  # connect() explains what is missing
    return pysqlite3


driver: ModuleType = _choose_driver()
Connection = Any  # the chosen driver's Connection class; both share the DB-API surface
DatabaseError: type[Exception] = driver.DatabaseError
OperationalError: type[Exception] = driver.OperationalError
IntegrityError: type[Exception] = driver.IntegrityError


def can_load_extensions() -> bool:
    return hasattr(driver.Connection, "enable_load_extension")


def connect(
    path: Path | str, *, extensions: tuple[str, ...] = (), busy_timeout_s: float = 30.0
) -> Connection:
    """Open `path` in autocommit mode (we issue BEGIN/COMMIT ourselves) and load `extensions`."""
    if extensions and not can_load_extensions():
        raise StoreError(
            "this Python's sqlite3 module cannot load extensions and pysqlite3 is not installed: "
            "pip install pysqlite3-binary (Linux x86_64) or use a Python built with "
            "--enable-loadable-sqlite-extensions"
        )
    try:
        conn = driver.connect(str(path), isolation_level=None, timeout=busy_timeout_s)
    except driver.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    if extensions:
        conn.enable_load_extension(True)
        try:
            for extension in extensions:
                conn.load_extension(extension)
        except driver.Error as exc:
            conn.close()
            raise StoreError(f"cannot load SQLite extension {extension}: {exc}") from exc
        conn.enable_load_extension(False)  # no SQL-level load_extension() afterwards
    return conn


def sqlite_version() -> str:
    return str(driver.sqlite_version)
