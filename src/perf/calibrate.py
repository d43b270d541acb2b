"""``keyetron bench calibrate``: measure the cost model's coefficients on this device.

The balancer predicts a sample's cost as ``vit = c*sum(p) + d*sum(p^2)`` over its images and
frames (p patches each) and ``llm = a*n + b*n^2`` per document of n tokens
(``keyetron.parallel.balancer``). Here each term is timed: the ViT + projector forward and
backward on one image of p patches for several p, the LLM forward + loss + backward on one
document of n tokens for several n. Least squares with non-negative coefficients gives
a, b, c, d in seconds, written as a calibration file (``units: seconds``) that
``data.loader.calibration`` / ``keyetron bench balance --calibration`` read.

The fit is then checked on held-out work it never saw: packed rows of several documents and
images of mixed sizes, timed whole, against ``vit_cost + llm_cost`` of their parts; the
relative errors are reported (and stored in the file's ``source``).

``--llm-layers K`` measures a slice of a model too large for the device (the full ViT plus
K decoder layers) and scales the LLM coefficients by layers/K; the embedding and head are
then counted once per K layers too, a small over-estimate stated in the report.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np
import torch

from keyetron.backend.device import autocast, default_device, device_name, supports_bf16, synchronize
from keyetron.batch import PackedBatch
from keyetron.model import build_model, load_model_config
from keyetron.objectives import LanguageModelObjective
from keyetron.parallel.balancer import CostModel


def _timed(fn, repeats: int, device) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _image(cfg, patches: int, device, generator):
    """One image of about ``patches`` patches: a grid of whole 2x2 merge blocks, near square."""
    m = cfg.projector.merge_size
    blocks = max(1, round(patches / (m * m)))
    h = max(1, int(blocks ** 0.5))
    w = max(1, blocks // h)
    grid = torch.tensor([[1, h * m, w * m]], device=device)
    p = cfg.vision.patch_size
    pixels = torch.randn((h * m * w * m, cfg.vision.num_channels, p, p), generator=generator).to(device)
    return pixels, grid


def _document_row(cfg, lengths: list[int], device, generator) -> PackedBatch:
    total = sum(lengths)
    ids = torch.randint(0, cfg.text.vocab_size - 512, (total,), generator=generator)
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths]).expand(3, total).clone()
    return PackedBatch(ids, pos, cu, ids.roll(-1)).to(device)


def _fit(x: np.ndarray, t: np.ndarray) -> tuple[float, float, float]:
    """Non-negative (fixed, linear, quadratic) coefficients of t ~ e + u*x + v*x^2 (active set:
    a negative coefficient is dropped and the rest refitted)."""
    columns = [np.ones_like(x), x, x * x]
    active = [0, 1, 2]
    while True:
        coef, *_ = np.linalg.lstsq(np.stack([columns[k] for k in active], axis=1), t, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            out = [0.0, 0.0, 0.0]
            for k, value in zip(active, coef):
                out[k] = max(0.0, float(value))
            return out[0], out[1], out[2]
        active.pop(int(np.argmin(coef)))


@dataclasses.dataclass
class Calibration:
    model: CostModel
    vit_points: list[tuple[int, float]]
    llm_points: list[tuple[int, float]]
    heldout: list[dict]  # per held-out row: measured and predicted seconds
    vit_fixed_s: float = 0.0  # per image call, outside the model (same on every rank)
    llm_fixed_s: float = 0.0  # per row

    @property
    def errors(self) -> list[float]:
        return [abs(h["predicted_s"] - h["measured_s"]) / h["measured_s"] for h in self.heldout]


def calibrate(config: str, *, patches: list[int], tokens: list[int], repeats: int = 3, llm_layers: int | None = None,
              heldout_rows: int = 4, row_tokens: int | None = None, seed: int = 0, device=None) -> Calibration:
    device = device or default_device()
    cfg = load_model_config(config)
    full_layers = cfg.text.num_layers
    if llm_layers is not None:
        if not 0 < llm_layers <= full_layers:
            raise ValueError(f"--llm-layers must be in 1..{full_layers} for {cfg.name}, got {llm_layers}")
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=llm_layers))
    model = build_model(cfg, device=device, seed=seed)
    dtype = torch.bfloat16 if supports_bf16(device) else None
    gen = torch.Generator().manual_seed(seed)

    def vit_step(pixels, grid):
        with autocast(device, dtype):
            out = model.encode_vision(pixels, grid)
        out.float().sum().backward()

    objective = LanguageModelObjective()

    def llm_step(row):
        with autocast(device, dtype):
            loss = objective(model(row), row)
        loss.loss_sum.backward()

    vit_points = []
    for p in patches:
        pixels, grid = _image(cfg, p, device, gen)
        vit_points.append((int(grid.prod()), _timed(lambda: vit_step(pixels, grid), repeats, device)))
    llm_points = []
    for n in tokens:
        row = _document_row(cfg, [n], device, gen)
        llm_points.append((n, _timed(lambda: llm_step(row), repeats, device)))
    # The fixed part of a call (launches, the embedding gradient, the optimizer's share) is the
    # same on every rank of a step, so it does not move the balance: reported, not in the model.
    vit_fixed, c, d = _fit(*map(np.array, zip(*vit_points)))
    llm_fixed, a, b = _fit(*map(np.array, zip(*llm_points)))
    scale = full_layers / cfg.text.num_layers
    cost = CostModel(a * scale, b * scale, c, d, units="seconds",
                     source=f"keyetron bench calibrate on {device_name(device)}, config {cfg.name}"
                            + (f", LLM measured on {llm_layers}/{full_layers} layers" if llm_layers else ""))

    # held out: packed rows of several documents and images, timed whole
    row_tokens = row_tokens or max(tokens)
    rng = np.random.default_rng(seed + 1)
    heldout = []
    for _ in range(heldout_rows):
        lengths, left = [], row_tokens
        while left > 16:
            n = int(min(left, rng.integers(16, max(17, row_tokens // 2))))
            lengths.append(n)
            left -= n
        images = [_image(cfg, int(rng.choice(patches)), device, gen) for _ in range(int(rng.integers(1, 4)))]
        row = _document_row(cfg, lengths, device, gen)

        def whole(row=row, images=images):
            for pixels, grid in images:
                vit_step(pixels, grid)
            llm_step(row)

        measured = _timed(whole, repeats, device)
        sizes = [int(g.prod()) for _, g in images]
        # the held-out check uses the slice's own LLM cost (scale 1): it times the slice
        predicted = (vit_fixed * len(sizes) + c * sum(sizes) + d * sum(s * s for s in sizes)
                     + llm_fixed + a * sum(lengths) + b * sum(n * n for n in lengths))
        heldout.append({"documents": lengths, "image_patches": sizes, "measured_s": measured,
                        "predicted_s": predicted})
    return Calibration(cost, vit_points, llm_points, heldout, vit_fixed, llm_fixed)


def format_report(cal: Calibration) -> str:
    m = cal.model
    lines = [f"cost model ({m.source}):",
             f"  LLM  a = {m.a:.4e} s/token   b = {m.b:.4e} s/token^2",
             f"  ViT  c = {m.c:.4e} s/patch   d = {m.d:.4e} s/patch^2",
             f"  fixed per call (not in the model: equal on every rank): ViT {cal.vit_fixed_s * 1e3:.2f} ms, "
             f"LLM {cal.llm_fixed_s * 1e3:.2f} ms",
             "ViT points (patches, s): " + ", ".join(f"({p}, {t:.4f})" for p, t in cal.vit_points),
             "LLM points (tokens, s):  " + ", ".join(f"({n}, {t:.4f})" for n, t in cal.llm_points),
             "held-out packed rows (measured vs predicted):"]
    for h in cal.heldout:
        lines.append(f"  {len(h['documents'])} docs / {len(h['image_patches'])} images: measured "
                     f"{h['measured_s'] * 1e3:.1f} ms, predicted {h['predicted_s'] * 1e3:.1f} ms "
                     f"({(h['predicted_s'] / h['measured_s'] - 1):+.1%})")
    if cal.heldout:
        lines.append(f"prediction error: mean {statistics.mean(cal.errors):.1%}, max {max(cal.errors):.1%}")
    return "\n".join(lines)


__all__ = ["Calibration", "calibrate", "format_report"]
