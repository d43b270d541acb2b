"""Assigning the samples of a global step to data-parallel ranks and packed rows so that
every rank's ViT work and LLM work are both close to the mean.

Why both phases: the ViT runs first, then the LLM, and the ranks meet in collectives
inside each phase, so a step costs ``max_r vit_r + max_r llm_r``. Balancing only the LLM
leaves the ViT at ~1.2 on a realistic mix (shared/reference/performance.md).

**Cost model** (metadata only, from ``SampleCost``; nothing is decoded). A sample is one
LLM document of n tokens and owns ViT attention sequences (images, video frames) of p_i
patches: ``llm = a*n + b*n^2`` and ``vit = c*sum(p_i) + d*sum(p_i^2)``. ``CostModel.from_flops``
derives a, b, c, d from the analytic FLOP counts of a model config (``FlopCounter``; the
projector is billed per patch in c); a GPU measurement can replace them with a calibration
file (``CostModel.load``), whose schema is::

    {"version": 1, "units": "flop" | "seconds", "a": <LLM per token>, "b": <LLM per token^2
     of a document>, "c": <ViT per patch>, "d": <ViT per patch^2 of a frame>, "source": "<free text>"}

(JSON, or the same keys in YAML for a ``.yaml``/``.yml`` path; ``source`` is optional.)

**Measures** (``imbalance_report``): per phase and for their sum, max/mean over ranks and
the ratio of the max to the lower bound ``max(mean, largest single sample)``: no
assignment can do better than that bound, so it is the figure a target is set on.

**Algorithm** (``assign``): each sample's cost is normalised per phase by that phase's lower
bound, so 1.0 is the best any rank can do; (1) outliers are placed (policy below); (2) the
rest go largest first, each to the rank where it leaves the lowest peak
``max(vit_r, llm_r)`` (greedy LPT on two dimensions); (3) refinement: while the peak is
above 1.005, the peak rank moves one sample to, or swaps one with, a rank among the 4 least
loaded in each phase, taking the exchange that leaves the lower peak of the two ranks; when
no single exchange helps, it pools its samples with one of the 16 least-loaded ranks and
splits them again greedily; (4) each rank's samples are packed into rows with best-fit
decreasing (``plan_rows``). The sum ViT + LLM per rank is reported, not optimised: the phases
synchronise separately, so the step follows the per-phase peaks.

**Outlier policy.** A sample whose ViT or LLM cost alone exceeds a rank's fair share (the
phase mean) is placed first, alone, on an empty rank, and never moved. Other samples join
that rank only where that gives the lowest peak, i.e. in practice never when they cost in the
outlier's phase (the rank is already at the lower bound there); max/mean is then set by the
outlier and no assignment can lower it, so the ratio to the lower bound is the figure to report.

**Row caps.** Every row holds at most ``row_tokens`` tokens (the memory cap of a
micro-batch); a sample longer than a row is an error (apply the packer's oversize policy
first). With ``rows_per_rank`` M, a rank receives at most M*row_tokens tokens; if best-fit
then needs more than M rows, samples of its emptiest row move to the rank with the lowest
load that still packs into M rows, and if none can take them a ValueError says to raise
``rows_per_rank``. Without M, each rank gets the rows it needs and ``rows_per_rank`` reports
the largest count: all ranks run that many micro-batches, short ones padded with empty rows.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from keyetron.data.dataset import SampleCost
from keyetron.data.packing import plan_rows

CALIBRATION_VERSION = 1
_UNITS = ("flop", "seconds")
_REFINE_PARTNER_RANKS = 4  # exchanges are tried with this many least-loaded ranks per phase
_EPS = 1e-9
_REPARTITION_RANKS = 16  # when no single exchange helps, the peak rank re-splits with these


class CalibrationError(ValueError):
    """A calibration file is missing, unreadable or has a bad key; the message names both."""


@dataclass(frozen=True)
class CostModel:
    """Predicted cost of a sample: ``llm = a*n + b*n^2`` per document, ``vit = c*p + d*p^2`` per frame."""

    a: float
    b: float
    c: float
    d: float
    units: str = "flop"
    source: str = ""

    def __post_init__(self):
        for name in "abcd":
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"cost coefficient {name} must be a finite number >= 0, got {value!r}")
        if self.units not in _UNITS:
            raise ValueError(f"cost units must be one of {_UNITS}, got {self.units!r}")

    @classmethod
    def from_flops(cls, model_cfg, trainable=None) -> CostModel:
        """Coefficients in FLOPs from a ``KeyeConfig`` (or a config name/path) and the trainable modules."""
        from keyetron.model.config import load_model_config
        from keyetron.flops import FlopCounter

        cfg = load_model_config(model_cfg) if isinstance(model_cfg, (str, Path)) else model_cfg
        fc = FlopCounter(cfg, trainable)
        mult = fc.multipliers
        third = {m: 1.0 if mult[m] > 2 else 1 / 3 for m in mult}  # attention: forward only when nothing trains upstream
        return cls(
            a=float(mult["llm"] * (fc.llm_body_params + fc.llm_head_params)),  # head billed on every token
            b=float(fc.llm_attention_coeff * third["llm"]),
            c=float(mult["vit"] * fc.vit_params + mult["projector"] * fc.projector_params / fc.merge_tokens),
            d=float(fc.vit_attention_coeff * third["vit"]),
            units="flop", source=f"FLOP count of model config {cfg.name!r}")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """A calibration file (schema in the module docstring); errors name the file and the key."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise CalibrationError(f"calibration file {path}: cannot read it ({err.strerror})") from err
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml
                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except Exception as err:  # noqa: BLE001 - any parse error is the file's fault
            raise CalibrationError(f"calibration file {path}: not valid {path.suffix or 'JSON'} ({err})") from err
        if not isinstance(raw, dict):
            raise CalibrationError(f"calibration file {path}: expected a mapping of keys a, b, c, d, units")
        allowed = {"version"} | {f.name for f in fields(cls)}
        for key in raw:
            if key not in allowed:
                raise CalibrationError(f"calibration file {path}: unknown key {key!r}; allowed: {sorted(allowed)}")
        if raw.get("version", CALIBRATION_VERSION) != CALIBRATION_VERSION:
            raise CalibrationError(f"calibration file {path}: key 'version' is {raw['version']!r}, "
                                   f"this keyetron reads version {CALIBRATION_VERSION}")
        for key in ("a", "b", "c", "d", "units"):
            if key not in raw:
                raise CalibrationError(f"calibration file {path}: missing key {key!r}")
        for key in "abcd":
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise CalibrationError(f"calibration file {path}: key {key!r} must be a number >= 0, got {v!r}")
        if raw["units"] not in _UNITS:
            raise CalibrationError(f"calibration file {path}: key 'units' must be one of {_UNITS}, "
                                   f"got {raw['units']!r}")
        return cls(**{k: v for k, v in raw.items() if k != "version"})

    def save(self, path: str | Path) -> None:
        path = Path(path)
        data = {"version": CALIBRATION_VERSION, **asdict(self)}
        if path.suffix in (".yaml", ".yml"):
            import yaml
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            path.write_text(json.dumps(data, indent=2) + "\n")

    def llm_cost(self, doc_lengths: Sequence[int]) -> float:
        n = np.asarray(doc_lengths, dtype=np.float64)
        return float(self.a * n.sum() + self.b * (n * n).sum())

    def vit_cost(self, patches: Sequence[int]) -> float:
        p = np.asarray(patches, dtype=np.float64)
        return float(self.c * p.sum() + self.d * (p * p).sum())

    def sample_cost(self, cost: SampleCost) -> tuple[float, float]:
        """(vit, llm) of one sample: it is one LLM document and one ViT sequence per image/frame."""
        return self.vit_cost(cost.vit_patches), self.llm_cost([cost.llm_tokens])

    def costs(self, costs: Sequence[SampleCost]) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample (vit, llm) arrays for many samples at once (same values as ``sample_cost``)."""
        n = np.fromiter((c.llm_tokens for c in costs), dtype=np.float64, count=len(costs))
        counts = np.fromiter((len(c.vit_patches) for c in costs), dtype=np.int64, count=len(costs))
        p = np.fromiter(itertools.chain.from_iterable(c.vit_patches for c in costs), dtype=np.float64,
                        count=int(counts.sum()))
        owner = np.repeat(np.arange(len(costs)), counts)
        vit = (self.c * np.bincount(owner, p, minlength=len(costs))
               + self.d * np.bincount(owner, p * p, minlength=len(costs)))
        return vit, self.a * n + self.b * n * n


@dataclass
class Assignment:
    """Rows (lists of sample indices) per rank, and the predicted per-rank loads."""

    rows: list[list[list[int]]]  # rank -> row (micro-batch) -> indices into the input samples
    vit: np.ndarray  # (n_ranks,) predicted ViT load
    llm: np.ndarray  # (n_ranks,) predicted LLM load
    tokens: np.ndarray  # (n_ranks,) LLM tokens
    largest_vit: float  # the costliest single sample per phase and combined (lower-bound terms)
    largest_llm: float
    largest_combined: float
    row_tokens: int
    scheduler_ms: float = 0.0

    @property
    def n_ranks(self) -> int:
        return len(self.rows)

    @property
    def combined(self) -> np.ndarray:
        return self.vit + self.llm

    @property
    def rows_per_rank(self) -> int:
        """Micro-batches every rank runs this step (the most any rank needs)."""
        return max((len(r) for r in self.rows), default=0)

    def rank_of(self) -> dict[int, int]:
        return {i: r for r, rows in enumerate(self.rows) for row in rows for i in row}


def _phase_stats(load: np.ndarray, largest: float) -> dict[str, float]:
    mean = float(load.mean()) if load.size else 0.0
    bound = max(mean, largest)
    top = float(load.max()) if load.size else 0.0
    return {"max_over_mean": top / mean if mean > 0 else 1.0,
            "ratio_to_lower_bound": top / bound if bound > 0 else 1.0}


def imbalance_report(assignment: Assignment) -> dict:
    """max/mean and max/lower-bound for the ViT phase, the LLM phase and their sum, plus the row count."""
    return {"vit": _phase_stats(assignment.vit, assignment.largest_vit),
            "llm": _phase_stats(assignment.llm, assignment.largest_llm),
            "combined": _phase_stats(assignment.combined, assignment.largest_combined),
            "rows_per_rank": assignment.rows_per_rank,
            "scheduler_ms": assignment.scheduler_ms}


def _check_inputs(costs: Sequence[SampleCost], n_ranks: int, row_tokens: int) -> np.ndarray:
    if n_ranks <= 0 or row_tokens <= 0:
        raise ValueError(f"n_ranks ({n_ranks}) and row_tokens ({row_tokens}) must be positive")
    tokens = np.fromiter((c.llm_tokens for c in costs), dtype=np.int64, count=len(costs))
    bad = np.flatnonzero((tokens <= 0) | (tokens > row_tokens))
    if bad.size:
        c = costs[int(bad[0])]
        raise ValueError(f"sample {c.sample_id!r} has {c.llm_tokens} tokens; the balancer needs 1..row_tokens "
                         f"({row_tokens}): apply the packer's oversize policy (split or skip) before balancing")
    return tokens


def _finish(rank_items, costs, vit, llm, tokens, row_tokens, n_ranks, start) -> Assignment:
    rows = []
    for items in rank_items:
        plan = plan_rows([int(tokens[i]) for i in items], row_tokens) if items else []
        rows.append([[items[k] for k in row] for row in plan])
    owner = np.full(len(costs), -1)
    for r, items in enumerate(rank_items):
        owner[items] = r
    assert (owner >= 0).all(), "every sample is assigned"
    load = lambda x: np.bincount(owner, x, minlength=n_ranks)  # noqa: E731
    return Assignment(rows, load(vit), load(llm), load(tokens.astype(np.float64)),
                      float(vit.max(initial=0.0)), float(llm.max(initial=0.0)), float((vit + llm).max(initial=0.0)),
                      row_tokens, (time.perf_counter() - start) * 1e3)


def naive_assign(costs: Sequence[SampleCost], n_ranks: int, row_tokens: int,
                 model: CostModel | None = None) -> Assignment:
    """Sequential token fill: samples in order into the current row until the next does not fit,
    then a new row; rows dealt to ranks round-robin. The baseline the balancer is measured against."""
    start = time.perf_counter()
    tokens = _check_inputs(costs, n_ranks, row_tokens)
    vit, llm = (model or _default_model()).costs(costs)
    rows: list[list[int]] = []
    used = row_tokens
    for i, n in enumerate(tokens.tolist()):
        if used + n > row_tokens:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    per_rank = [rows[r::n_ranks] for r in range(n_ranks)]
    a = _finish([[i for row in rr for i in row] for rr in per_rank], costs, vit, llm, tokens, row_tokens,
                n_ranks, start)
    a.rows = per_rank  # keep the sequential rows, not a repacking of them
    return a


@functools.cache
def _default_model() -> CostModel:
    """FLOP-derived costs of the shipped Keye-8B config, used when no model is passed."""
    return CostModel.from_flops("keye-8b")


def assign(costs: Sequence[SampleCost], n_ranks: int, row_tokens: int, rows_per_rank: int | None = None,
           model: CostModel | None = None, max_refine_steps: int = 300) -> Assignment:
    """Balance ViT and LLM load over ``n_ranks`` in rows of at most ``row_tokens`` (see module docstring)."""
    start = time.perf_counter()
    tokens = _check_inputs(costs, n_ranks, row_tokens)
    vit, llm = (model or _default_model()).costs(costs)
    cap = math.inf if rows_per_rank is None else rows_per_rank * row_tokens
    if tokens.sum() > cap * n_ranks:
        raise ValueError(f"the batch has {int(tokens.sum())} tokens, more than {n_ranks} ranks x {rows_per_rank} "
                         f"rows x {row_tokens} tokens; raise rows_per_rank or make the global batch smaller")
    search = _Search(vit, llm, tokens, n_ranks, cap)
    search.place_outliers()
    search.greedy()
    search.refine(max_refine_steps)
    rank_items = search.rank_items()
    if rows_per_rank is not None:
        rank_items = search.fit_rows(rank_items, row_tokens, rows_per_rank)
    return _finish(rank_items, costs, vit, llm, tokens, row_tokens, n_ranks, start)


class _Search:
    """One balancing. Costs are normalised so that 1.0 is the lower bound of each dimension:
    ViT, LLM and their sum (rows of ``z`` and of ``load``)."""

    def __init__(self, vit: np.ndarray, llm: np.ndarray, tokens: np.ndarray, n_ranks: int, cap_tokens: float):
        self.n_ranks, self.cap = n_ranks, cap_tokens
        raw = np.stack([vit, llm])  # (2, N)
        mean = raw.sum(1) / n_ranks
        bound = np.maximum(mean, raw.max(1, initial=0.0))
        scale = np.where(bound > 0, 1 / np.where(bound > 0, bound, 1), 0.0)
        self.z = raw * scale[:, None]
        self.fair = mean * scale  # a rank's fair share, normalised
        self.t = tokens.astype(np.float64)
        self.owner = np.full(raw.shape[1], -1)
        self.load, self.tok = np.zeros((2, n_ranks)), np.zeros(n_ranks)
        self.pinned = np.zeros(raw.shape[1], bool)

    def _move(self, i: int, src: int, dst: int) -> None:
        self.owner[i] = dst
        self.load[:, dst] += self.z[:, i]
        self.tok[dst] += self.t[i]
        if src >= 0:
            self.load[:, src] -= self.z[:, i]
            self.tok[src] -= self.t[i]

    def place_outliers(self) -> None:
        """Each sample costlier than a phase's fair share first, alone, on an empty rank (module docstring)."""
        idx = np.flatnonzero((self.z[:2] > self.fair[:2, None] + _EPS).any(0))
        for i in idx[np.argsort(-self.z[:2, idx].max(0), kind="stable")]:
            empty = (self.tok == 0) & (self.t[i] <= self.cap)
            # More outliers than ranks: they share, least-loaded first.
            ok = empty if empty.any() else self.tok + self.t[i] <= self.cap
            self._move(int(i), -1, int(np.argmin(self.load.max(0) + np.where(ok, 0.0, np.inf))))
            self.pinned[i] = True

    def greedy(self) -> None:
        """Largest first, each to the rank where it leaves the lowest peak (ViT, LLM or sum)."""
        rest = np.flatnonzero(self.owner < 0)
        zt = self.z.T.copy()  # (N, 3): one row per sample, cheap to index in the loop
        for i in rest[np.argsort(-self.z[:, rest].max(0), kind="stable")].tolist():
            score = (self.load + zt[i][:, None]).max(0)
            if self.cap < math.inf:
                score[self.tok + self.t[i] > self.cap] = np.inf
            r = int(np.argmin(score))
            if score[r] == np.inf:
                raise ValueError("no rank has room for a sample: raise rows_per_rank")
            self.owner[i] = r
            self.load[:, r] += zt[i]
            self.tok[r] += self.t[i]

    def refine(self, max_steps: int, tol: float = 5e-3) -> None:
        """Move or swap one sample between the most-loaded rank and the least-loaded ones while that
        lowers the higher of the two ranks' loads (in whichever of ViT, LLM, sum is highest)."""
        k = min(_REFINE_PARTNER_RANKS, self.n_ranks - 1)
        for _ in range(max_steps):
            peak = self.load.max(0)
            b = int(np.argmax(peak))
            top = peak[b]
            mine = np.flatnonzero((self.owner == b) & ~self.pinned)
            if top <= 1.0 + tol or k <= 0 or not mine.size:
                return
            low = self.load.copy()
            low[:, b] = np.inf
            partners = np.unique(np.argpartition(low, k - 1, axis=1)[:, :k])
            theirs = np.flatnonzero(np.isin(self.owner, partners) & ~self.pinned)
            # Candidates: swaps (i, j) and moves (i -> r), a move being a swap with an empty item of rank r.
            zj = np.concatenate([self.z[:, theirs], np.zeros((2, len(partners)))], axis=1)[:, None, :]
            tj = np.concatenate([self.t[theirs], np.zeros(len(partners))])
            rj = np.concatenate([self.owner[theirs], partners])
            zi, ti = self.z[:, mine][:, :, None], self.t[mine][:, None]
            delta = zj - zi  # (3, k, m): what rank b gains
            score = np.maximum((self.load[:, b, None, None] + delta).max(0), (self.load[:, rj][:, None, :] - delta).max(0))
            bad = (self.tok[b] - ti + tj > self.cap) | (self.tok[rj] + ti - tj > self.cap)
            score[bad] = np.inf
            flat = int(np.argmin(score))
            if not score.flat[flat] < top - _EPS:
                if not self._repartition(b, top, np.argsort(peak, kind="stable")[:_REPARTITION_RANKS]):
                    return
                continue
            a, c = divmod(flat, score.shape[1])
            self._move(int(mine[a]), b, int(rj[c]))
            if c < len(theirs):
                self._move(int(theirs[c]), int(rj[c]), b)

    def _repartition(self, b: int, top: float, partners: np.ndarray) -> bool:
        """Pool the samples of rank b and one partner and split them again, largest first, each to
        the side where it leaves the lower peak; keep the first split that lowers the peak."""
        zt, t = self.z.T, self.t
        for r in partners.tolist():
            if r == b:
                continue
            pool = np.flatnonzero(((self.owner == b) | (self.owner == r)) & ~self.pinned)
            pool = pool[np.argsort(-self.z[:, pool].max(0), kind="stable")].tolist()
            side = {b: [], r: []}
            load = {q: self.load[:, q] - self.z[:, [i for i in pool if self.owner[i] == q]].sum(1) for q in (b, r)}
            tok = {q: self.tok[q] - t[[i for i in pool if self.owner[i] == q]].sum() for q in (b, r)}
            for i in pool:
                best = min((q for q in (b, r) if tok[q] + t[i] <= self.cap),
                           key=lambda q: (load[q] + zt[i]).max(), default=None)
                if best is None:
                    break
                side[best].append(i)
                load[best] = load[best] + zt[i]
                tok[best] += t[i]
            else:
                if max(load[b].max(), load[r].max()) < top - _EPS:
                    for q in (b, r):
                        self.owner[side[q]] = q
                        self.load[:, q], self.tok[q] = load[q], tok[q]
                    return True
        return False

    def rank_items(self) -> list[list[int]]:
        order = np.argsort(self.owner, kind="stable")
        bounds = np.searchsorted(self.owner[order], np.arange(self.n_ranks + 1))
        return [order[bounds[r]:bounds[r + 1]].tolist() for r in range(self.n_ranks)]

    def fit_rows(self, rank_items: list[list[int]], row_tokens: int, rows_per_rank: int) -> list[list[int]]:
        """Where best-fit needs more than ``rows_per_rank`` rows, move samples of the emptiest row away."""
        t = self.t.astype(np.int64)
        n_rows = lambda items: len(plan_rows([int(t[i]) for i in items], row_tokens)) if items else 0  # noqa: E731
        for src in range(self.n_ranks):
            while n_rows(rank_items[src]) > rows_per_rank:
                plan = plan_rows([int(t[i]) for i in rank_items[src]], row_tokens)
                emptiest = min(plan, key=lambda row: sum(int(t[rank_items[src][k]]) for k in row))
                i = min((rank_items[src][k] for k in emptiest), key=lambda i: (t[i], i))
                allowed = self.tok + self.t[i] <= self.cap
                allowed[src] = False
                for dst in np.argsort((self.load + self.z[:, i:i + 1]).max(0), kind="stable"):
                    if allowed[dst] and n_rows(rank_items[dst] + [i]) <= rows_per_rank:
                        break
                else:
                    raise ValueError(f"the batch does not pack into {rows_per_rank} rows of {row_tokens} tokens "
                                     f"on each of {self.n_ranks} ranks; raise rows_per_rank")
                rank_items[src].remove(i)
                rank_items[int(dst)] = sorted(rank_items[int(dst)] + [i])
                self._move(i, src, int(dst))
        return rank_items
