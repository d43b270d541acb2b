"""Cost-balanced steps: each global step's samples dealt to data-parallel ranks and rows by
predicted ViT + LLM cost (``keyetron.parallel.balancer.assign``) instead of streamed in order:
the cost-balanced assignment rule of ``keyetron.data.loader.Loader``.

**Cost index.** The balancer needs every candidate's cost before anything is read, and a
rank must not open other ranks' samples, so costs come from an index built once from
metadata (``keyetron.data.cost_index``). A record the index marks unusable, or longer than a
row (documents are never split here), is a counted skip.

**One global step.** All ranks hold the same state: the next position of the global order
(one seeded permutation per epoch, as ``StreamingRows``; one per stream under a mixture) and
the *carry-over*, positions
drawn but deferred. A step takes the carry-over first, then new positions, while the
predicted tokens stay within ``step_fill`` of all rows of all ranks (dp x rows_per_rank x
row_tokens) and, if set, ``samples_per_step``. ``assign`` deals them; if they do not pack
into ``rows_per_rank`` rows on every rank, the last one taken goes back to the carry-over
and the step is dealt again. Every rank computes the same assignment, reads only its own
samples and builds exactly its rows, padded to ``rows_per_rank`` (an all-padding row has no
loss tokens).

**Token-level mixture** (``mixture``, e.g. 24% video / 50% image / 26% text for 128K
annealing): the records are split by kind (a sample with a video, with images, text only:
``SampleCost.kind``) into streams with their own orders and cursors, and each draw comes from
the stream furthest below its share of the tokens drawn so far, so the shares hold at token
level over every step. Each step's measured shares are reported (``last_report["mix"]``).

**Exact resume and resize.** The state (epoch position, carry-over, skips) is global, so a
checkpoint resumes exactly, and under another data-parallel size the next step simply
deals the remaining samples to the new ranks: nothing lost, nothing repeated.
"""
from __future__ import annotations

import logging
from collections import Counter, deque

from keyetron.batch import Document, PackedBatch
from keyetron.data.cost_index import Unusable
from keyetron.data.dataset import SampleCost, SampleDataset, Skip, SkipLog
from keyetron.data.loader import EpochOrder, LoaderConfig, LocalReader
from keyetron.data.packing import build_row, padding_document
from keyetron.parallel.balancer import CostModel, assign, imbalance_report

log = logging.getLogger("keyetron.data")


class BalancedRows:
    """The rows of data-parallel rank ``dp_rank`` of ``dp_size`` for each balanced step."""

    def __init__(self, dataset: SampleDataset, cfg: LoaderConfig, costs: list[SampleCost | None],
                 rows_per_rank: int, pad_token_id: int, dp_rank: int = 0, dp_size: int = 1,
                 model: CostModel | None = None, documents=None):
        if len(costs) != len(dataset):
            raise ValueError(f"cost index has {len(costs)} records, {dataset.source.name} has {len(dataset)}: "
                             f"rebuild it (keyetron data index)")
        self.dataset, self.cfg, self.costs = dataset, cfg, costs
        self.rows_per_rank, self.pad_token_id = rows_per_rank, pad_token_id
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.model = model
        self._fetch = documents or LocalReader(dataset)
        # One stream of records per mixture category (one stream, "all", without a mixture), each
        # with its own seeded order per epoch and its own cursor.
        if cfg.mixture:
            self.streams = {k: [i for i, c in enumerate(costs) if isinstance(c, SampleCost) and c.kind == k]
                            for k in sorted(cfg.mixture) if cfg.mixture[k] > 0}
            empty = [k for k, records in self.streams.items() if not records]
            if empty:
                raise ValueError(f"data.loader.mixture asks for {empty} samples but {dataset.source.name} has none")
        else:
            self.streams = {"all": list(range(len(dataset)))}
        self.cursors = dict.fromkeys(self.streams, 0)  # next position of each stream
        self.mix_tokens = dict.fromkeys(self.streams, 0)  # tokens drawn per stream so far
        self.carry: deque[tuple[str, int]] = deque()  # (stream, position) drawn but deferred
        self._orders = {k: EpochOrder(records, cfg) for k, records in self.streams.items()}
        self.last_report: dict | None = None

    @property
    def epoch(self) -> int:
        return min(self.cursors[k] // len(v) for k, v in self.streams.items())

    def _record_at(self, stream: str, position: int) -> int:
        return self._orders[stream].record(position)

    def _next_stream(self) -> str:
        """The stream furthest below its token share (the mixture), ties to the first name."""
        if not self.cfg.mixture:
            return "all"
        total = sum(self.mix_tokens.values())
        return max(sorted(self.streams), key=lambda k: self.cfg.mixture[k] * total - self.mix_tokens[k])

    def _skip(self, cost: SampleCost | Unusable, index: int) -> None:
        """Count an unusable draw once (every rank sees the same candidates), as the loader would log it."""
        if self.dp_rank:
            return
        if isinstance(cost, Unusable):
            self.dataset.skips.add(cost.kind, cost.sample_id, cost.location, cost.reason)
        else:
            self.dataset.skips.add("packing", cost.sample_id, f"record {index}",
                                   f"{cost.llm_tokens} tokens exceed the row length {self.cfg.row_tokens}; balanced "
                                   "steps never split documents: raise the row length or filter the data")

    def _draw(self) -> list[tuple[str, int]]:
        """(stream, position) of this step: carry-over first, within the token budget (module docstring)."""
        row = self.cfg.row_tokens
        budget = self.cfg.step_fill * self.dp_size * self.rows_per_rank * row
        limit = self.cfg.samples_per_step or float("inf")
        taken, tokens, unusable = [], 0, 0
        while len(taken) < limit:
            from_carry = bool(self.carry)
            if from_carry:
                stream, position = self.carry[0]
            else:
                stream = self._next_stream()
                position = self.cursors[stream]
            index = self._record_at(stream, position)
            cost = self.costs[index]
            usable = isinstance(cost, SampleCost)
            if usable and tokens + cost.llm_tokens > budget and taken:
                break
            if from_carry:
                self.carry.popleft()
            else:
                self.cursors[stream] += 1
            if not usable or cost.llm_tokens > row:
                unusable += 1
                if unusable > len(self.costs):
                    raise RuntimeError(f"no record of {self.dataset.source.name} is usable in rows of {row} "
                                       f"tokens; see the skip log:\n{self.dataset.skips.summary()}")
                self._skip(cost, index)
                continue
            taken.append((stream, position))
            tokens += cost.llm_tokens
            if not from_carry:
                self.mix_tokens[stream] += cost.llm_tokens
        return taken

    def next_rows(self, n: int) -> list[PackedBatch]:
        assert n == self.rows_per_rank, (n, self.rows_per_rank)
        taken = self._draw()
        while True:
            records = [self._record_at(*p) for p in taken]
            costs = [self.costs[i] for i in records]
            try:
                assignment = assign(costs, self.dp_size, self.cfg.row_tokens, self.rows_per_rank, self.model)
                break
            except ValueError:
                if len(taken) == 1:
                    raise
                self.carry.appendleft(taken.pop())
        self.last_report = imbalance_report(assignment)
        if self.model is not None and self.model.units == "seconds":  # a calibrated model predicts time
            self.last_report["predicted_step_s"] = float(assignment.vit.max() + assignment.llm.max())
        mine = assignment.rows[self.dp_rank]
        kinds = Counter()
        for c in costs:  # the step's token mixture (all ranks)
            kinds[c.kind] += c.llm_tokens
        self.last_report["mix"] = {k: v / sum(kinds.values()) for k, v in sorted(kinds.items())}
        model = self.model or CostModel(0, 0, 1, 0)  # without a model: patches
        rows = []
        for row in mine:  # one fetch per row: its ViT work is shared out by predicted cost
            wanted = [records[k] for k in row]
            docs = self._fetch(wanted, [model.vit_cost(costs[k].vit_patches) for k in row])
            rows.append(self._row(list(zip(wanted, [costs[k] for k in row], docs))))
        while len(rows) < self.rows_per_rank:
            rows.append(PackedBatch.from_documents([padding_document(self.cfg.row_tokens, self.pad_token_id)]))
        return rows

    def _row(self, members: list[tuple[int, SampleCost, Document | None]]) -> PackedBatch:
        docs = []
        for index, cost, doc in members:
            if doc is None:  # a bad sample: already a counted skip; the row keeps its room as padding
                continue
            if doc.sample_id != cost.sample_id or len(doc) > cost.llm_tokens:
                raise RuntimeError(f"record {index} of {self.dataset.source.name} gives sample {doc.sample_id!r} "
                                   f"of {len(doc)} tokens but the cost index says {cost.sample_id!r} of at most "
                                   f"{cost.llm_tokens}: the data changed since the index was built; delete the "
                                   f"index (data.loader.cost_index) to rebuild it")
            docs.append(doc)
        if not docs:
            docs = [padding_document(self.cfg.row_tokens, self.pad_token_id)]
        return build_row(docs, self.cfg.row_tokens, True, self.pad_token_id)

    # -- exact resume: one global state ----------------------------------------------------
    @staticmethod
    def reshard_states(states: dict[int, dict], new_dp: int) -> dict[int, dict]:
        return reshard_balanced_states(states, new_dp)

    def state_dict(self) -> dict:
        return {"kind": "balanced", "cursors": dict(self.cursors), "mix_tokens": dict(self.mix_tokens),
                "carry": [list(c) for c in self.carry], "skips": self.dataset.skips.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "balanced":
            raise ValueError("this checkpoint's loader state is a streaming one (data.loader.balance was off); "
                             "resume with balance off, or start the data from the beginning")
        if set(state["cursors"]) != set(self.streams):
            raise ValueError(f"loader state has streams {sorted(state['cursors'])}, this run {sorted(self.streams)}: "
                             f"data.loader.mixture changed; resetting the data (checkpoint.start_reset: [data]) "
                             f"starts the new mixture")
        self.cursors, self.mix_tokens = dict(state["cursors"]), dict(state["mix_tokens"])
        self.carry = deque((s, p) for s, p in state["carry"])
        self.dataset.skips.load_state_dict(state["skips"])


def reshard_balanced_states(states: dict[int, dict], new_dp: int) -> dict[int, dict]:
    """The global state for every new rank; the old ranks' skip logs merged into rank 0's."""
    first = states[0]
    assert all(s["cursors"] == first["cursors"] and s["carry"] == first["carry"] for s in states.values()), (
        "balanced loader states of one checkpoint must agree")
    skips = SkipLog()
    for s in states.values():
        skips.counts.update(s["skips"]["counts"])
        skips.entries.extend(Skip(**e) for e in s["skips"]["entries"][:SkipLog.MAX_KEPT - len(skips.entries)])
    return {r: {**first, "skips": (skips if r == 0 else SkipLog()).state_dict()} for r in range(new_dp)}


__all__ = ["BalancedRows", "reshard_balanced_states"]
