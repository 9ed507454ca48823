"""The ingest package's own exceptions: user-caused failures, each with a message a user can act on."""

from __future__ import annotations


class IngestError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class LoadError(IngestError):
    """One file cannot be read (corrupt, encrypted, empty, not UTF-8...): it is skipped and reported."""


class StoreError(IngestError):
    """The index database cannot be opened, is not ours, or is newer than this code."""


class EmbedderMismatchError(StoreError):
    """The index was built with another embedding model than the one this run uses."""
