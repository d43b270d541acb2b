"""Where samples come from: JSONL manifests and WebDataset tar shards, both random-access.

A source is a list of records. ``len(source)`` and ``source.record(i)`` are all a loader
needs, so the sampler can shuffle, shard across data-parallel ranks and resume at an exact
record without reading what comes before it.

- **JSONL manifest**: one sample object per line (format in ``keyetron.data.samples``);
  media paths are relative to the manifest's folder. Opening indexes the byte offset of
  every non-blank line once (a 10M-line manifest indexes in seconds), so ``record(i)``
  is one seek.
- **WebDataset tar shard**: members grouped by key (the file name up to its first dot,
  WebDataset's convention): ``000123.json`` holds the sample object and its media sit
  beside it (``000123.jpg``, ``000123.clip.mp4``, ...), referred to from the JSON by member
  name (``{"image": "000123.jpg"}``). Opening lists the members once; ``record(i)``
  extracts only that group's media into a scratch folder that lives until the record is
  closed.

A line that is not JSON is not an exception here: it comes back as a record whose
``error`` says what is wrong, so the loader counts and logs it like any other bad sample.
"""
from __future__ import annotations

import bisect
import json
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class SourceError(ValueError):
    """A manifest or shard that cannot be opened at all (the job should stop and say which)."""


@dataclass
class RawRecord:
    """One sample as stored: the parsed JSON object (or why it could not be parsed)."""

    location: str  # "manifest.jsonl:17" or "shard-0001.tar:000123": where to look
    raw: Any = None
    error: str | None = None
    root: Path = Path(".")  # media paths in ``raw`` are relative to this folder
    _scratch: Path | None = None

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> RawRecord:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SampleSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def record(self, index: int) -> RawRecord: ...


class JsonlSource:
    """A JSONL manifest, indexed by line offsets."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_file():
            raise SourceError(f"manifest {self.path} does not exist; check the recipe's data.sources paths")
        self._offsets: list[tuple[int, int]] = []  # (byte offset, line number)
        with self.path.open("rb") as f:
            offset = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    self._offsets.append((offset, number))
                offset += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def record(self, index: int) -> RawRecord:
        offset, number = self._offsets[index]
        location = f"{self.path.name}:{number}"
        with self.path.open("rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            raw = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return RawRecord(location, error=f"line {number} is not valid JSON ({err})", root=self.path.parent)
        return RawRecord(location, raw=raw, root=self.path.parent)


def _key(member_name: str) -> str:
    base = member_name.rsplit("/", 1)[-1]
    prefix = member_name[: len(member_name) - len(base)]
    return prefix + base.split(".", 1)[0]


class TarShardSource:
    """One WebDataset tar shard, indexed by sample key."""

    def __init__(self, path: str | Path, scratch_dir: str | Path | None = None):
        self.path = Path(path)
        self.name = str(self.path)
        self.scratch_dir = Path(scratch_dir) if scratch_dir else None
        try:
            with tarfile.open(self.path) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
        except (OSError, tarfile.TarError) as err:
            raise SourceError(f"shard {self.path} cannot be read as a tar file ({err}); re-create it with "
                              f"`tar cf` or WebDataset's ShardWriter") from err
        groups: dict[str, list[str]] = {}
        for m in members:
            groups.setdefault(_key(m.name), []).append(m.name)
        self._keys = sorted(groups)
        self._members = groups

    def __len__(self) -> int:
        return len(self._keys)

    def record(self, index: int) -> RawRecord:
        key = self._keys[index]
        location = f"{self.path.name}:{key}"
        names = self._members[key]
        json_names = [n for n in names if n.endswith(".json")]
        if len(json_names) != 1:
            return RawRecord(location, error=f"expected exactly one .json member for key {key!r}, found "
                                             f"{len(json_names)} among {sorted(names)}")
        scratch = Path(tempfile.mkdtemp(prefix="keyetron-wds-", dir=self.scratch_dir))
        record = RawRecord(location, root=scratch, _scratch=scratch)
        try:
            with tarfile.open(self.path) as tar:
                for name in names:
                    src = tar.extractfile(name)
                    target = scratch / name.rsplit("/", 1)[-1]
                    with src, target.open("wb") as out:
                        shutil.copyfileobj(src, out)
            record.raw = json.loads((scratch / json_names[0].rsplit("/", 1)[-1]).read_bytes())
        except (OSError, tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError) as err:
            record.error = f"member group {key!r} cannot be read ({err})"
        return record


def open_source(path: str | Path, scratch_dir: str | Path | None = None) -> SampleSource:
    """A source for a ``.jsonl`` manifest or a ``.tar`` shard, chosen by the file name."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return JsonlSource(path)
    if path.suffix == ".tar":
        return TarShardSource(path, scratch_dir)
    raise SourceError(f"{path}: unknown source type; use a .jsonl manifest or a .tar WebDataset shard")


class ConcatSource:
    """Several sources seen as one list of records (global index -> (source, local index))."""

    def __init__(self, sources: Sequence[SampleSource]):
        if not sources:
            raise SourceError("no data sources given; list at least one .jsonl or .tar under data.sources")
        self.sources = list(sources)
        self.name = ",".join(s.name for s in self.sources)
        self._starts = [0]
        for s in self.sources:
            self._starts.append(self._starts[-1] + len(s))

    def __len__(self) -> int:
        return self._starts[-1]

    def record(self, index: int) -> RawRecord:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = bisect.bisect_right(self._starts, index) - 1
        return self.sources[k].record(index - self._starts[k])


__all__ = ["ConcatSource", "JsonlSource", "RawRecord", "SampleSource", "SourceError", "TarShardSource",
           "open_source"]
