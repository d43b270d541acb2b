"""The cost index: every record's cost, from metadata only (file headers and text; nothing decoded).

Cost-balanced steps (``keyetron.parallel.balanced_rows``) need every candidate's cost before
anything is read, and a rank must not open other ranks' samples, so costs come from an index
built once: ``keyetron data index RECIPE``, or at start-up by rank 0 when the recipe's index is
missing or was built for other data or media settings (``keyetron.parallel.loading.ensure_cost_index``).
Stage 0 uses it too, to know which records are one-image samples without opening them.
A record that is unusable is an ``Unusable`` entry: the skip as the loader would have logged it
(kind, sample id, ``file:line``, reason), so a run that never opens it still reports why.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from keyetron.data.dataset import SampleCost, SampleDataset, SkipRecorder

log = logging.getLogger("keyetron.data")

INDEX_VERSION = 3


@dataclass(frozen=True)
class Unusable:
    """A record the index found unusable, with the skip the loader logs for it."""

    kind: str  # the skip kind: bad_record, bad_sample, bad_media, ...
    sample_id: str
    location: str  # file:line or shard:key
    reason: str


Entry = SampleCost | Unusable


def index_fingerprint(dataset: SampleDataset) -> dict:
    """What the costs depend on: the records, the media settings, the model's tokens."""
    builder = dataset.builder
    return {"source": dataset.source.name, "records": len(dataset), "media": asdict(builder.media),
            "model": builder.model.name, "tokenizer": str(getattr(builder.tok, "path", ""))}


def build_cost_index(dataset: SampleDataset, path: str | Path) -> list[Entry]:
    """Every record's cost from metadata (``Unusable``: why not) written to ``path``."""
    skips, dataset.skips = dataset.skips, SkipRecorder()  # the run's skip log counts what training meets
    entries: list[Entry] = []
    try:
        for i in range(len(dataset)):
            dataset.skips.events.clear()
            cost = dataset.cost(i)
            if cost is None:
                event = dataset.skips.events[-1] if dataset.skips.events else \
                    ("bad_sample", f"<record {i}>", f"record {i}", "no cost could be read")
                cost = Unusable(*event)
            entries.append(cost)
    finally:
        dataset.skips = skips
    unusable = [e for e in entries if isinstance(e, Unusable)]
    if unusable:
        log.warning("cost index: %d records are unusable, e.g. %s (%s): %s", len(unusable), unusable[0].sample_id,
                    unusable[0].location, unusable[0].reason)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": INDEX_VERSION, "fingerprint": index_fingerprint(dataset),
                               "costs": [_encode(e) for e in entries]}))
    os.replace(tmp, path)
    return entries


def _encode(entry: Entry):
    if isinstance(entry, Unusable):
        return {"unusable": [entry.kind, entry.sample_id, entry.location, entry.reason]}
    return [entry.sample_id, entry.llm_tokens, list(entry.vit_patches), entry.kind]


def _decode(raw) -> Entry:
    if isinstance(raw, dict):
        return Unusable(*raw["unusable"])
    return SampleCost(raw[0], raw[1], tuple(raw[2]), raw[3])


def load_cost_index(path: str | Path, dataset: SampleDataset) -> list[Entry] | None:
    """The index at ``path``, or None when it is missing or was built for other data/settings."""
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("version") != INDEX_VERSION or data.get("fingerprint") != index_fingerprint(dataset):
        log.info("cost index %s was built for other data or media settings (or by an older version); it is "
                 "rebuilt", path)
        return None
    return [_decode(c) for c in data["costs"]]


__all__ = ["INDEX_VERSION", "Unusable", "build_cost_index", "index_fingerprint", "load_cost_index"]
