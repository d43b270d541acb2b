"""The trainer's data side, from the recipe: decode offload, the loader for this rank, and the
per-step sample-id log."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from keyetron.data.batch import PackedBatch
from keyetron.data.dataset import SampleDataset
from keyetron.data.loader import PackedLoader
from keyetron.data.packing import PADDING_SAMPLE_ID

log = logging.getLogger("keyetron.train")


def build_decoder(data):
    """The decode-server client of ``data.decode_servers`` (None: decode in this process)."""
    if not data.decode_servers:
        return None
    from keyetron.io.client import RemoteDecoder
    from keyetron.io.protocol import load_secret

    log.info("decoding media on %s (local decoding when they are unreachable)", ", ".join(data.decode_servers))
    return RemoteDecoder(data.decode_servers, load_secret(data.decode_secret_file), timeout=data.decode_timeout_s)


def build_loader(dataset: SampleDataset, recipe, model_cfg, trainable: dict[str, bool], topo, pad_token_id: int,
                 out: Path):
    """This rank's loader: topology-aware under a parallel layout (``keyetron.parallel.loading``),
    cost-balanced with ``data.loader.balance``, else the streaming packer."""
    from keyetron.parallel.balance import CostModel
    from keyetron.parallel.balanced_loading import BalancedRows, ensure_cost_index
    from keyetron.parallel.loading import TopologyLoader

    cfg, accum = recipe.data.loader, recipe.train.grad_accum
    costs = cost_model = None
    if cfg.balance:
        costs = ensure_cost_index(dataset, cfg.cost_index or out / "cost_index.json", topo)
        cost_model = CostModel.load(cfg.calibration) if cfg.calibration else CostModel.from_flops(model_cfg, trainable)
    if topo.distributed:
        return TopologyLoader(dataset, cfg, pad_token_id, topo, costs=costs, rows_per_step=accum,
                              cost_model=cost_model)
    if cfg.balance:
        return BalancedRows(dataset, cfg, costs, accum, pad_token_id, model=cost_model)
    return PackedLoader(dataset, cfg, pad_token_id=pad_token_id)


def log_sample_ids(out: Path, topo, step: int, rows: list[PackedBatch]) -> None:
    """Data provenance (``log.sample_ids``): the samples of ``step``, one file per data-parallel
    rank, written by its first stage-0 rank."""
    if topo.pp_rank or topo.cp_rank or topo.tp_rank:
        return
    ids = [s for r in rows for s in r.sample_ids if s != PADDING_SAMPLE_ID]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"sample_ids.dp{topo.dp_rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "dp": topo.dp_rank, "of": topo.dims.dp, "ids": ids}) + "\n")


__all__ = ["build_decoder", "build_loader", "log_sample_ids"]
