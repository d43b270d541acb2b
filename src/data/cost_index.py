"""The cost index: every record's cost, from metadata only (file headers and text; nothing decoded).

Cost-balanced steps (``keyetron.parallel.balanced_rows``) need every candidate's cost before
anything is read, and a rank must not open other ranks' samples, so costs come from an index
built once: ``keyetron data index RECIPE``, or at start-up by rank 0 when the recipe's index is
missing or was built for other data or media settings (``keyetron.parallel.loading.ensure_cost_index``).
Stage 0 uses it too, to know which records are one-image samples without opening them.
A record the index marks unusable is None.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from keyetron.data.dataset import SampleCost, SampleDataset, SkipLog

log = logging.getLogger("keyetron.data")

INDEX_VERSION = 2


def index_fingerprint(dataset: SampleDataset) -> dict:
    """What the costs depend on: the records, the media settings, the model's tokens."""
    builder = dataset.builder
    return {"source": dataset.source.name, "records": len(dataset), "media": asdict(builder.media),
            "model": builder.model.name, "tokenizer": str(getattr(builder.tok, "path", ""))}


def build_cost_index(dataset: SampleDataset, path: str | Path) -> list[SampleCost | None]:
    """Every record's cost from metadata (None: unusable, a counted skip) written to ``path``."""
    skips, dataset.skips = dataset.skips, SkipLog()  # the run's skip log counts what training meets
    try:
        costs = [dataset.cost(i) for i in range(len(dataset))]
        if dataset.skips.total:
            log.warning("cost index: %d records are unusable\n%s", dataset.skips.total, dataset.skips.summary())
    finally:
        dataset.skips = skips
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": INDEX_VERSION, "fingerprint": index_fingerprint(dataset),
                               "costs": [None if c is None else [c.sample_id, c.llm_tokens, list(c.vit_patches),
                                                                 c.kind] for c in costs]}))
    os.replace(tmp, path)
    return costs


def load_cost_index(path: str | Path, dataset: SampleDataset) -> list[SampleCost | None] | None:
    """The index at ``path``, or None when it is missing or was built for other data/settings."""
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("version") != INDEX_VERSION or data.get("fingerprint") != index_fingerprint(dataset):
        log.info("cost index %s was built for other data or media settings; it is rebuilt", path)
        return None
    return [None if c is None else SampleCost(c[0], c[1], tuple(c[2]), c[3]) for c in data["costs"]]


__all__ = ["INDEX_VERSION", "build_cost_index", "index_fingerprint", "load_cost_index"]
