"""Errors about input data that a loader counts and logs as skips instead of stopping the job."""
from __future__ import annotations

from pathlib import Path


class MediaError(ValueError):
    """An image or video file that cannot be used; carries the path and what went wrong."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
