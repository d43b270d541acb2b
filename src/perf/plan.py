"""``keyetron plan``: predicted memory and step time of every feasible layout, ranked.

    keyetron plan --model keye-8b --gpus 64 --seq 131072 [--calibration FILE] [--gpu-memory-gib 80]
                  [--measured DIR/layouts.json] [--global-batch ROWS] [...]

**Layouts**: tp * pp * cp * dp = G with tp in 1..8 (within a node), dividing the query heads, and
dividing or divided by the KV heads; pp dividing the decoder layers; cp dividing G/(tp*pp) with
S/(2cp) whole (zigzag halves); every data-parallel rank takes m = global rows / dp packed rows of S
tokens per step (m >= pp: one micro-batch per stage at least). Default global batch: G rows.

**Memory** per GPU, the worse of pipeline stage 0 and the last stage (bytes; P = parameters held
by the stage: its L/pp decoder layers / tp, plus the embedding / tp and the ViT + projector on
stage 0, the head / tp and the final norm on the last):

    weights               = wb * (P_llm + P_vit)      (--precision bf16: wb 2; fp32, autocast: 4)
    grads                 = 4 * (P_llm + P_vit)       (fp32: bf16 runs sum them in fp32 main gradients)
    optimizer (ZeRO-1)    = 12 * P_llm / (dp*cp) + (8 + mb) * P_vit
                            (fp32 master + 2 moments of the LLM sharded over dp x cp; the ViT is stepped
                             in full, with an fp32 master (mb 4) when its weights are bf16, else none)
    peak                  = weights + grads + optimizer + max(activations, 4 * P_llm)
                            (4 * P_llm: the flat fp32 gradient copy ZeRO-1 reduce-scatters, after backward)

Activations per micro-batch and decoder layer, for t = S/cp local tokens, all divided by tp
(tensor + sequence parallel shard every one of them): ``(12h + 6q + 6kv + 6I) * t / tp`` bytes
(term by term in ``layer_activation_bytes``); context parallel also keeps the gathered K and V of
the whole row for the backward, ``4 * kv_local * (S - t)`` (kv_local: KV width per TP rank). With
activation checkpointing a layer keeps only its fp32 input (``4h`` per token) plus one layer's
activations while it is recomputed. Stage 0 holds
min(pp, m) micro-batches in flight under 1F1B (the ViT's activations too: ``20 h_v + 4 I_v``
bytes per patch and layer on its 1/(tp*cp) share of the patches); the last stage adds the
vocabulary-parallel logits, 6 bytes (bf16 + fp32) per token and vocabulary entry / tp.

**Step time** = (m + pp - 1) * T_mb + T_dp (1F1B: bubble (pp-1)/(m+pp-1)), where T_mb is one
micro-batch on one stage: the cost model's row cost / (pp * tp * cp) (x 4/3 with activation
checkpointing: the forward runs twice), plus TP (8 all-gathers/reduce-scatters of t*h*2 bytes per
layer, 12 with recompute), CP (all-gather of K, V forward and reduce-scatter of dK, dV backward per
layer, +1 with recompute) and pipeline sends (activation forward, gradient backward). T_dp is
ZeRO-1's reduce-scatter of fp32 gradients and all-gather of weights over dp x cp, and the ViT's
all-reduce over dp x cp x tp. Ring collectives move (n-1)/n of the gathered size per GPU; a group
within one node (its rank span <= --gpus-per-node; rank order tp, cp, dp, pp) runs at
--nvlink-gbs, otherwise at --network-gbs per GPU. Communication is not overlapped with compute
(this engine reduces after backward; TP/CP collectives are blocking): an upper bound. FLOP cost
models run at --peak-tflops x --efficiency; a calibration file in seconds is used as is. The
optimizer update itself is not modelled.

**Measured** (``--measured``, a ``bench layouts`` JSON): each measured layout is predicted with the
run's own model, world, rows, micro-batches and workload (its documents' and frames' sums, and the
FLOPs the trainer counted), on the hardware flags given here, and the relative error printed.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from keyetron.model.config import KeyeConfig, load_model_config
from keyetron.parallel.balancer import CostModel
from keyetron.flops import parameter_counts_from_config

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    peak_tflops: float = 989.0  # H100 SXM dense BF16 (performance.md)
    efficiency: float = 0.5  # fraction of the peak the kernels reach (FLOP cost models only)
    nvlink_gbs: float = 360.0  # per GPU, within a node (ring bus bandwidth)
    network_gbs: float = 45.0  # per GPU, across nodes (a 400 Gb/s NIC per GPU)
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    reserve_gib: float = 6.0  # CUDA context, NCCL buffers, allocator fragmentation
    precision: str = "bf16"  # train.precision: bf16 | fp32 | autocast (keyetron.parallel.mixed_precision)

    @property
    def weight_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    def bandwidth(self, span: int) -> float:
        """Bytes/s of a collective whose ranks span ``span`` consecutive ranks."""
        return (self.nvlink_gbs if span <= self.gpus_per_node else self.network_gbs) * 1e9


@dataclass(frozen=True)
class Workload:
    """One packed row: real tokens, sum of squared document lengths, ViT patches, sum of squared frame patches."""

    tokens: float
    tokens_sq: float
    patches: float = 0.0
    patches_sq: float = 0.0
    flops: float | None = None  # as counted by the trainer (a measured row; the head on loss tokens only)


def synthetic_workload(seq: int, doc_tokens: int, visual_fraction: float, frame_patches: int, merge: int) -> Workload:
    """A full row of S tokens in documents of ``doc_tokens``; ``visual_fraction`` of its tokens are
    visual, each ``merge`` patches, in frames of ``frame_patches``."""
    docs = [doc_tokens] * (seq // doc_tokens) + ([seq % doc_tokens] if seq % doc_tokens else [])
    patches = int(seq * visual_fraction) * merge
    whole, rest = divmod(patches, frame_patches)
    frames = [frame_patches] * whole + ([rest] if rest else [])
    return Workload(seq, sum(n * n for n in docs), patches, sum(p * p for p in frames))


@dataclass(frozen=True)
class Shape:
    """The sizes the formulas need, from a model config."""

    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    kv_heads: int
    heads: int
    inter: int
    vocab: int
    layer_params: int
    embed_params: int
    head_params: int
    vis_params: int
    vit_layers: int
    vit_hidden: int
    vit_inter: int

    @classmethod
    def of(cls, cfg: KeyeConfig) -> Shape:
        t, v = cfg.text, cfg.vision
        counts = parameter_counts_from_config(cfg)
        embed = t.vocab_size * t.hidden_size
        head = 0 if t.tie_word_embeddings else embed
        layer = (counts["llm"] - embed - head - t.hidden_size) // t.num_layers
        return cls(t.num_layers, t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.num_kv_heads,
                   t.num_heads, t.intermediate_size, t.vocab_size, layer, embed, head,
                   counts["vit"] + counts["projector"], v.num_layers, v.hidden_size, v.intermediate_size)

    def kv_local(self, tp: int) -> float:
        """KV width per TP rank (heads split, or one replicated head each when tp > KV heads)."""
        return self.kv_dim / min(tp, self.kv_heads)


def layer_activation_bytes(s: Shape) -> int:
    """Saved for backward per token and decoder layer (bf16 activations, fp32 residual stream):
    attention 4h (norm input) + 2h (norm output) + 2(q + 2kv) (q, k, v) + 2(q + kv) (after
    norm + RoPE) + 2q (attention output); MLP 4h + 2h + 2I (gate) + 2I (up) + 2I (act * up)."""
    return 12 * s.hidden + 6 * s.q_dim + 6 * s.kv_dim + 6 * s.inter


def vit_activation_bytes(s: Shape) -> int:
    """Per patch and ViT layer: 4h+2h (LayerNorm 1), 6h (q, k, v), 2h (attention output), 4h+2h
    (LayerNorm 2), 2I + 2I (fc1 output, GELU output)."""
    return 20 * s.vit_hidden + 4 * s.vit_inter


def memory(s: Shape, tp: int, pp: int, cp: int, dp: int, seq: int, m: int, w: Workload, hw: Hardware,
           ac: bool) -> dict[str, float]:
    """Bytes per GPU on the worse of stage 0 and the last stage (formulas in the module docstring)."""
    t = seq / cp
    full_layer = layer_activation_bytes(s) * t / tp + 4 * s.kv_local(tp) * (seq - t)
    per_layer = 4 * s.hidden * t / tp if ac else full_layer
    recompute = full_layer if ac else 0.0  # one layer's activations while it is recomputed
    patches = w.patches / (tp * cp)
    vit = s.vit_layers * patches * (4 * s.vit_hidden if ac else vit_activation_bytes(s))
    vit += vit_activation_bytes(s) * patches if ac else 0.0
    logits = 6 * t * s.vocab / tp
    layers = s.layers / pp
    stages = {}
    for name, first, last in (("first", True, pp == 1), ("last", pp == 1, True)):
        llm = layers * s.layer_params / tp + (s.embed_params / tp if first else 0) + (
            s.head_params / tp + s.hidden if last else 0)
        vis = s.vis_params if first else 0
        in_flight = min(pp, m) if first else 1
        act = in_flight * (layers * per_layer + (vit if first else 0)) + recompute + (logits if last else 0)
        vis_master = 4 if hw.weight_bytes < 4 else 0
        static = {"weights": hw.weight_bytes * (llm + vis), "grads": 4 * (llm + vis),
                  "optimizer": 12 * llm / (dp * cp) + (8 + vis_master) * vis}
        stages[name] = static | {"activations": act, "reduce_buffer": 4 * llm,
                                 "total": sum(static.values()) + max(act, 4 * llm), "llm_params": llm,
                                 "vis_params": vis}
    return max(stages.values(), key=lambda x: x["total"])


def row_cost(cost: CostModel, w: Workload) -> float:
    """LLM + ViT cost of one row in the cost model's units (FLOPs or seconds on one GPU); a FLOP
    model takes the trainer's count where the row has one (``CostModel.from_flops`` bills the LM
    head on every token, the trainer on loss tokens only)."""
    if cost.units == "flop" and w.flops is not None:
        return w.flops
    return cost.a * w.tokens + cost.b * w.tokens_sq + cost.c * w.patches + cost.d * w.patches_sq


def seconds_per_row(cost: CostModel, w: Workload, hw: Hardware) -> float:
    return row_cost(cost, w) / (1.0 if cost.units == "seconds" else hw.peak_tflops * 1e12 * hw.efficiency)


def step_time(s: Shape, cost: CostModel, tp: int, pp: int, cp: int, dp: int, seq: int, m: int, w: Workload,
              hw: Hardware, ac: bool, mem: dict) -> dict[str, float]:
    compute = seconds_per_row(cost, w, hw) * (4 / 3 if ac else 1.0) / (pp * tp * cp)
    t, layers = seq / cp, s.layers / pp
    tp_comm = layers * (12 if ac else 8) * t * s.hidden * 2 * (tp - 1) / tp / hw.bandwidth(tp)
    kv_gathered = seq * 2 * s.kv_local(tp) * 2
    cp_comm = layers * (3 if ac else 2) * kv_gathered * (cp - 1) / cp / hw.bandwidth(tp * cp)
    # stage neighbours are tp*cp*dp ranks apart
    pp_comm = 2 * t * s.hidden * 2 / tp / hw.bandwidth(tp * cp * dp + 1) if pp > 1 else 0.0
    micro = compute + tp_comm + cp_comm + pp_comm
    n_llm, n_vis = dp * cp, dp * cp * tp
    dp_comm = ((4 + hw.weight_bytes) * mem["llm_params"] * (n_llm - 1) / n_llm
               + 2 * 4 * mem["vis_params"] * (n_vis - 1) / n_vis) / hw.bandwidth(tp * cp * dp)
    step = (m + pp - 1) * micro + dp_comm
    return {"compute_s": m * compute, "tp_comm_s": m * tp_comm, "cp_comm_s": m * cp_comm, "pp_comm_s": m * pp_comm,
            "dp_comm_s": dp_comm, "bubble": (pp - 1) / (m + pp - 1), "step_s": step}


def candidate_layouts(cfg: KeyeConfig, gpus: int, seq: int, gpus_per_node: int = 8) -> list[tuple[int, int, int, int]]:
    """(tp, pp, cp, dp) with tp*pp*cp*dp = gpus under the rules of the module docstring."""
    t = cfg.text
    out = []
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or gpus % tp or t.num_heads % tp or (t.num_kv_heads % tp and tp % t.num_kv_heads):
            continue
        for pp in range(1, t.num_layers + 1):
            if t.num_layers % pp or (gpus // tp) % pp:
                continue
            rest = gpus // (tp * pp)
            for cp in range(1, rest + 1):
                if rest % cp == 0 and seq % (2 * cp) == 0:
                    out.append((tp, pp, cp, rest // cp))
    return out


def predict(cfg: KeyeConfig, cost: CostModel, flops: CostModel, tp: int, pp: int, cp: int, dp: int, seq: int,
            global_rows: int, w: Workload, hw: Hardware, ac_mode: str = "auto") -> dict:
    """Memory and step time of one layout; ``ac_mode`` auto: without activation checkpointing when it fits."""
    s = Shape.of(cfg)
    row = {"layout": f"tp{tp}pp{pp}cp{cp}dp{dp}", "tp": tp, "pp": pp, "cp": cp, "dp": dp}
    if global_rows % dp or global_rows // dp < pp:
        return row | {"fits": False, "why": f"global batch {global_rows} rows: not {dp} x m rows with m >= pp={pp}"}
    m, gpus = global_rows // dp, tp * pp * cp * dp
    cap = (hw.memory_gib - hw.reserve_gib) * GIB
    choices = {"auto": (False, True), "on": (True,), "off": (False,)}[ac_mode]
    for ac in choices:
        mem = memory(s, tp, pp, cp, dp, seq, m, w, hw, ac)
        if mem["total"] <= cap:
            break
    time = step_time(s, cost, tp, pp, cp, dp, seq, m, w, hw, ac, mem)
    fits = mem["total"] <= cap
    return row | {"micro_batches": m, "ac": ac, "fits": fits,
                  "why": "" if fits else f"needs {mem['total'] / GIB:.1f} GiB > {cap / GIB:.0f} GiB usable",
                  "memory_gib": {k: v / GIB for k, v in mem.items() if not k.endswith("params")}, **time,
                  "tokens_per_s_per_gpu": global_rows * w.tokens / time["step_s"] / gpus,
                  "mfu": global_rows * row_cost(flops, w) / (time["step_s"] * gpus * hw.peak_tflops * 1e12)}


def plan(cfg: KeyeConfig, gpus: int, seq: int, global_rows: int, w: Workload, hw: Hardware,
         cost: CostModel | None = None, ac_mode: str = "auto") -> list[dict]:
    """Every candidate layout: those that fit by predicted step time, then the rest by memory."""
    flops = CostModel.from_flops(cfg)
    rows = [predict(cfg, cost or flops, flops, *lay, seq, global_rows, w, hw, ac_mode)
            for lay in candidate_layouts(cfg, gpus, seq, hw.gpus_per_node)]
    return sorted(rows, key=lambda r: (0, r["step_s"]) if r["fits"] else
                  (1, r["memory_gib"]["total"] if "memory_gib" in r else math.inf))


def compare_measured(results: dict, hw: Hardware, calibration: CostModel | None = None) -> list[dict]:
    """Predicted against measured step time for each layout of a ``bench layouts`` JSON, on the
    measured model, rows, workload (and counted FLOPs) and micro-batches, without activation
    checkpointing, on the hardware of ``hw``."""
    out = []
    for r in results.get("layouts", []):
        if "error" in r:
            continue
        cfg = load_model_config(r["model"])
        w = Workload(**r["workload_per_row"], flops=r["tflop_per_step"] * 1e12 / (r["micro_batches"] * r["dp"]))
        flops = CostModel.from_flops(cfg)
        p = predict(cfg, calibration or flops, flops, r["tp"], r["pp"], r["cp"], r["dp"], round(r["row_tokens"]),
                    r["micro_batches"] * r["dp"], w, hw, "off")
        out.append({"layout": r["layout"], "measured_s": r["step_s"], "predicted_s": p["step_s"],
                    "error": p["step_s"] / r["step_s"] - 1, "measured_memory_gib": r["memory_max_gib"],
                    "memory_kind": r["memory_kind"], "predicted_memory_gib": p["memory_gib"]["total"]})
    return out


def format_plan(rows: list[dict], top: int) -> str:
    head = ("| rank | layout | m | AC | memory GiB (weights+grads / optimizer / activations / ZeRO buffer) | "
            "compute s | TP / CP / DP comm s | bubble | step s | tokens/s per GPU | MFU | fits |")
    lines = [head, "|" + "---|" * 12]
    shown = [r for r in rows if r["fits"]][:top] + [r for r in rows if not r["fits"]][:max(top // 2, 3)]
    for i, r in enumerate(shown, 1):
        if "step_s" not in r:
            lines.append(f"| - | {r['layout']} |" + " |" * 9 + f" no: {r['why']} |")
            continue
        g = r["memory_gib"]
        lines.append(
            f"| {i if r['fits'] else '-'} | {r['layout']} | {r['micro_batches']} | {'on' if r['ac'] else 'off'} | "
            f"{g['total']:.1f} ({g['weights'] + g['grads']:.1f} / {g['optimizer']:.1f} / {g['activations']:.1f} / "
            f"{g['reduce_buffer']:.1f}) | "
            f"{r['compute_s']:.3g} | {r['tp_comm_s']:.2g} / {r['cp_comm_s']:.2g} / {r['dp_comm_s']:.2g} | "
            f"{r['bubble']:.0%} | {r['step_s']:.3g} | {r['tokens_per_s_per_gpu']:.4g} | {r['mfu']:.1%} | "
            f"{'yes' if r['fits'] else 'no: ' + r['why']} |")
    hidden = len(rows) - len(shown)
    return "\n".join(lines) + (f"\n\n({hidden} more layouts not shown; --top N or --json for all)" if hidden else "")


def format_comparison(rows: list[dict]) -> str:
    lines = ["| layout | measured step s | predicted step s | error | measured memory GiB | predicted GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['measured_s']:.3f} | {r['predicted_s']:.3g} | {r['error']:+.0%} | "
                     f"{r['measured_memory_gib']:.2f} ({r['memory_kind']}) | {r['predicted_memory_gib']:.2f} |")
    return "\n".join(lines)


def no_fit_advice(rows: list[dict], args) -> str:
    """What to change when no layout fits: how far the closest one is, and the knobs that close the gap."""
    sized = [r for r in rows if "memory_gib" in r]
    if not sized:
        return ("No layout gives every pipeline stage a micro-batch: raise --global-batch (rows per step) to at "
                "least the pipeline depth times the data-parallel size, or use more GPUs.")
    best = min(sized, key=lambda r: r["memory_gib"]["total"])
    usable = args.gpu_memory_gib - args.reserve_gib
    return (f"The closest is {best['layout']}: {best['memory_gib']['total']:.1f} GiB for {usable:g} GiB usable. "
            f"To fit: more GPUs (--gpus), shorter rows (--seq), activation checkpointing "
            f"(--activation-checkpointing on), "
            + ("" if args.precision == "bf16" else "bf16 weights (--precision bf16), ")
            + "or a device with more memory (--gpu-memory-gib).")


def run(args) -> int:
    """The ``keyetron plan`` command (arguments from ``keyetron.cli``)."""
    cfg = load_model_config(args.model)
    hw = Hardware(args.peak_tflops, args.efficiency, args.nvlink_gbs, args.network_gbs, args.gpus_per_node,
                  args.gpu_memory_gib, args.reserve_gib, args.precision)
    calibration = CostModel.load(args.calibration) if args.calibration else None
    doc = args.doc_tokens or args.seq
    w = synthetic_workload(args.seq, doc, args.visual_fraction, args.frame_patches, cfg.projector.merge_size ** 2)
    global_rows = args.global_batch or args.gpus
    rows = plan(cfg, args.gpus, args.seq, global_rows, w, hw, calibration, args.activation_checkpointing)
    comparison = None
    if args.measured:
        with open(args.measured) as f:
            comparison = compare_measured(json.load(f), hw, calibration)
    if args.json:
        print(json.dumps({"hardware": asdict(hw), "workload": asdict(w), "layouts": rows, "measured": comparison},
                         indent=2))
        return 0
    cost = (calibration.source or args.calibration) if calibration else f"the FLOP count of {cfg.name}"
    print(f"plan: {cfg.name} on {args.gpus} GPUs ({hw.gpus_per_node} per node, {hw.memory_gib:g} GiB, "
          f"{hw.reserve_gib:g} reserved); rows of {args.seq} tokens in documents of {doc}, "
          f"{args.visual_fraction:.0%} visual tokens; global batch {global_rows} rows "
          f"({global_rows * args.seq / 1e6:.2f}M tokens)\n"
          f"step time: {cost}" + (f" at {hw.peak_tflops:g} TFLOP/s x {hw.efficiency:g}"
                                  if not calibration or calibration.units == "flop" else " (seconds)")
          + f"; NVLink {hw.nvlink_gbs:g} GB/s, network {hw.network_gbs:g} GB/s per GPU; communication not "
          f"overlapped; 1F1B; precision {hw.precision} (weights {hw.weight_bytes} B/param). MFU uses {hw.peak_tflops:g} TFLOP/s.\n"
          f"m: rows per data-parallel rank and step; memory: the fuller pipeline stage, total = weights + grads + "
          f"optimizer + max(activations, ZeRO buffer)\n")
    print(format_plan(rows, args.top))
    feasible = sum(r["fits"] for r in rows)
    print(f"\n{feasible} of {len(rows)} layouts fit in memory.")
    if not feasible:
        print(no_fit_advice(rows, args))
    if comparison is not None:
        print("\nprediction against measurement (" + args.measured + "):\n" + format_comparison(comparison))
    return 0 if feasible else 1


__all__ = ["Hardware", "Shape", "Workload", "candidate_layouts", "compare_measured", "layer_activation_bytes",
           "memory", "plan", "predict", "step_time", "synthetic_workload", "vit_activation_bytes"]
