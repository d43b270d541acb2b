"""The ``keyetron`` command: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
import sys

from keyetron.train.run import user_error


def _model_info(args: argparse.Namespace) -> int:
    from keyetron.model import build_model, load_model_config, parameter_counts

    cfg = load_model_config(args.config)
    counts = parameter_counts(build_model(cfg, device="meta"))
    if args.json:
        print(json.dumps(counts))
        return 0
    print(f"model config: {cfg.name}")
    for part in ("vit", "projector", "llm", "total"):
        print(f"  {part:<10} {counts[part]:>15,d}  ({counts[part] / 1e9:.3f} B)")
    return 0


def _data_slowfast(args: argparse.Namespace) -> int:
    from keyetron.data.slowfast import PROFILES, plan_video
    from keyetron.data.video import MediaError

    if args.profile not in PROFILES:
        print(f"keyetron: unknown Slow-Fast profile {args.profile!r}; choose one of {sorted(PROFILES)}", file=sys.stderr)
        return 2
    try:
        plan, _frames = plan_video(args.video, args.profile, fps=args.fps, total_tokens=args.total_tokens)
    except MediaError as err:
        print(f"keyetron: {err}", file=sys.stderr)
        return 1
    fields = {
        "n_frames": plan.n_frames, "frame_types": list(plan.frame_types),
        "timestamps": [round(t, 3) for t in plan.timestamps], "slow_hw": list(plan.slow_hw),
        "fast_hw": list(plan.fast_hw), "visual_tokens": plan.visual_tokens, "source_hw": list(plan.source_hw),
    }
    if args.json:
        print(json.dumps(fields))
    else:
        for key, value in fields.items():
            print(f"{key:>14}: {value}")
    return 0


def _data_make_demo(args: argparse.Namespace) -> int:
    from keyetron.data.demo import make_demo

    try:
        summary = make_demo(args.out, seed=args.seed, train_size=args.train_size, eval_size=args.eval_size)
    except FileExistsError as err:
        print(f"keyetron: {err}", file=sys.stderr)
        return 1
    sizes = "  ".join(f"{split} {sum(tasks.values())} samples ({summary.media[split]['images']} images, "
                      f"{summary.media[split]['videos']} videos)" for split, tasks in summary.tasks.items())
    print(f"wrote the demo dataset to {summary.out}: {sizes}; seed {summary.seed}")
    print(f"eval majority baseline {summary.baselines['overall']['accuracy']:.1%}; "
          f"task counts and baselines are in {summary.out / 'demo.json'}")
    return 0


def _bench_balance(args: argparse.Namespace) -> int:
    from keyetron.perf.balance import BenchUsageError, check_arguments, format_report, run_bench
    from keyetron.parallel.balancer import CostModel

    try:
        check_arguments(args.ranks, args.row_tokens, args.samples, args.rows_per_rank)
        model = CostModel.load(args.calibration) if args.calibration else CostModel.from_flops(args.config)
        report = run_bench(args.ranks, args.row_tokens, args.samples, args.seed, args.rows_per_rank, model)
    except BenchUsageError as err:
        print(f"keyetron bench balance: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _bench_layouts(args: argparse.Namespace) -> int:
    from keyetron.perf.layouts import run

    return run(args)


def _plan(args: argparse.Namespace) -> int:
    from keyetron.perf.plan import run

    return run(args)


def _bench_calibrate(args: argparse.Namespace) -> int:
    from keyetron.perf.calibrate import calibrate, format_report

    cal = calibrate(args.config, patches=args.patches, tokens=args.tokens, repeats=args.repeats,
                    llm_layers=args.llm_layers, heldout_rows=args.heldout_rows, seed=args.seed)
    cal.model.save(args.out)
    if args.json:
        print(json.dumps({"coefficients": dataclasses.asdict(cal.model), "vit_points": cal.vit_points,
                          "llm_points": cal.llm_points, "heldout": cal.heldout, "errors": cal.errors}))
    else:
        print(format_report(cal))
        print(f"wrote {args.out}")
    return 0


def _data_index(args: argparse.Namespace) -> int:
    from keyetron.data.dataset import DocumentBuilder, SampleDataset
    from keyetron.data.sources import ConcatSource, open_source
    from keyetron.data.tokenizer import KeyeTokenizer
    from keyetron.model import load_model_config
    from keyetron.data.cost_index import SampleCost, build_cost_index
    from keyetron.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    cfg = load_model_config(recipe.model.config)
    builder = DocumentBuilder(cfg, KeyeTokenizer(cfg.tokenizer), recipe.data.media)
    dataset = SampleDataset(ConcatSource([open_source(s) for s in recipe.data.sources]), builder)
    out = args.out or recipe.data.loader.cost_index or f"{recipe.output_dir}/cost_index.json"
    costs = build_cost_index(dataset, out)
    usable = [c for c in costs if isinstance(c, SampleCost)]
    unusable = [c for c in costs if not isinstance(c, SampleCost)]
    for entry in unusable:
        print(f"keyetron: unusable sample {entry.sample_id} ({entry.location}, {entry.kind}): {entry.reason}",
              file=sys.stderr)
    print(json.dumps({"index": str(out), "records": len(costs), "unusable": len(unusable),
                      "llm_tokens": sum(c.llm_tokens for c in usable),
                      "vit_patches": sum(sum(c.vit_patches) for c in usable)}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from keyetron.train.run import layout_overrides, run, train_argv
    from keyetron.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set + layout_overrides(args.tp, args.pp, args.cp, None))
    return run(recipe, train_argv(args.recipe, args.tp, args.pp, args.cp, None, args.set))


def _bench_generate(args: argparse.Namespace) -> int:
    from keyetron.perf.generate import run_bench

    report = run_bench(args.config, args.prompts, args.new_tokens, args.prompt_tokens, args.batch_size,
                       reference=not args.no_reference, memory=not args.no_memory)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from keyetron.train.generate import run

    return run(args)


def _merge(args: argparse.Namespace) -> int:
    from keyetron.model.hf_checkpoint import CheckpointError
    from keyetron.train.merge import MergeError, load_merge_recipe, merge, recipe_from_cli

    if args.recipe and (args.checkpoints or args.out or args.weights):
        print("keyetron: merge takes either --recipe or checkpoints with --out, not both", file=sys.stderr)
        return 2
    if args.recipe:
        recipe = load_merge_recipe(args.recipe)
    else:
        recipe = recipe_from_cli(args.checkpoints, args.weights, args.out, hf_output=args.hf, dtype=args.dtype,
                                 config=args.config)
    try:
        summary = merge(recipe)
    except (MergeError, CheckpointError) as err:
        print(f"keyetron: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def _launch(args: argparse.Namespace) -> int:
    from keyetron.launch.submit import main as launch_main

    return launch_main(args)


def _io_server(args: argparse.Namespace) -> int:
    from keyetron.io.server import run_server

    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyetron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("model-info", help="parameter counts of a model config (built on the meta device)")
    info.add_argument("--config", required=True, help="a named config (keye-8b, small, tiny) or a YAML path")
    info.add_argument("--json", action="store_true", help="print JSON with keys total, vit, projector, llm")
    info.set_defaults(func=_model_info)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True, metavar="TOOL")
    sf = data.add_parser("slowfast", help="the Slow-Fast plan of one video: frame types, sizes and token counts")
    sf.add_argument("video")
    sf.add_argument("--profile", default="paper", help="paper (default) or keye-vl-utils")
    sf.add_argument("--fps", type=float, default=None, help="sampling rate (default 2.0, capped by the source rate)")
    sf.add_argument("--total-tokens", type=int, default=None, help="visual token budget of the whole video")
    sf.add_argument("--json", action="store_true")
    sf.set_defaults(func=_data_slowfast)

    demo = data.add_parser("make-demo", help="write the deterministic demo dataset (train + held-out eval split)")
    demo.add_argument("out", help="output folder (created; an existing demo folder is regenerated)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-size", type=int, default=3000)
    demo.add_argument("--eval-size", type=int, default=300)
    demo.set_defaults(func=_data_make_demo)

    index = data.add_parser("index", help="per-record ViT/LLM costs from metadata, for balanced loading "
                            "(data.loader.balance); built at start-up when missing")
    index.add_argument("recipe", help="the recipe whose sources, media settings and model the costs are for")
    index.add_argument("--out", default=None, help="index path (default: data.loader.cost_index or "
                       "<output_dir>/cost_index.json, where training looks)")
    index.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    index.set_defaults(func=_data_index)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True,
                                                                      metavar="BENCH")
    bal = bench.add_parser("balance", help="load balancer vs naive token filling on a synthetic video/image/text mix")
    bal.add_argument("--ranks", type=int, required=True, help="data-parallel ranks")
    bal.add_argument("--row-tokens", type=int, required=True, help="tokens per packed row (micro-batch)")
    bal.add_argument("--samples", type=int, default=1024, help="samples in the global batch (default 1024)")
    bal.add_argument("--seed", type=int, default=0)
    bal.add_argument("--rows-per-rank", type=int, default=None, help="cap on rows per rank (default: as needed)")
    bal.add_argument("--config", default="keye-8b", help="model config whose FLOPs give the default cost model")
    bal.add_argument("--calibration", default=None, help="cost calibration file (JSON/YAML) instead of FLOPs")
    bal.add_argument("--json", action="store_true", help="print JSON: naive and balanced reports (vit, llm, "
                     "combined: max_over_mean, ratio_to_lower_bound; rows_per_rank; scheduler_ms)")
    bal.set_defaults(func=_bench_balance)

    cal = bench.add_parser("calibrate", help="time the ViT and LLM on this device and fit the balancer's cost "
                           "model (a, b, c, d in seconds); reports the error on held-out packed rows")
    cal.add_argument("--config", default="keye-8b", help="model config (default keye-8b)")
    cal.add_argument("--out", required=True, help="calibration file to write (.json or .yaml)")
    cal.add_argument("--patches", type=int, nargs="+", default=[256, 1024, 2304, 4096],
                     help="ViT items to time, in patches")
    cal.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                     help="LLM document lengths to time")
    cal.add_argument("--llm-layers", type=int, default=None,
                     help="time this many decoder layers and scale (a model too large for the device)")
    cal.add_argument("--repeats", type=int, default=3)
    cal.add_argument("--heldout-rows", type=int, default=4, help="packed rows to check the fit on")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--json", action="store_true")
    cal.set_defaults(func=_bench_calibrate)
    gb = bench.add_parser("generate", help="rollout engine (KV cache) vs the cache-less greedy loop: tokens/s, "
                          "peak tensor memory, same tokens")
    gb.add_argument("--config", default="small")
    gb.add_argument("--prompts", type=int, default=64)
    gb.add_argument("--new-tokens", type=int, default=256)
    gb.add_argument("--prompt-tokens", type=int, default=48, help="text tokens per prompt (every other one adds "
                    "a 16-token image)")
    gb.add_argument("--batch-size", type=int, default=64)
    gb.add_argument("--no-reference", action="store_true", help="skip the cache-less loop")
    gb.add_argument("--no-memory", action="store_true", help="skip the second, instrumented run per path")
    gb.add_argument("--out", default=None, help="also write the JSON report here")
    gb.set_defaults(func=_bench_generate)

    lay = bench.add_parser("layouts", help="real training steps per parallel layout: tokens/s, MFU, memory, "
                           "pipeline bubble, data wait (one torchrun launch per layout)")
    lay.add_argument("--recipe", required=True, help="a recipe YAML; its data is read and decoded for real")
    lay.add_argument("--layouts", required=True, help="comma-separated, e.g. tp2pp2cp1,tp1pp4cp2 (optional dpN)")
    lay.add_argument("--steps", type=int, required=True, help="measured optimizer steps per layout")
    lay.add_argument("--warmup", type=int, default=1, help="steps run before measuring (default 1)")
    lay.add_argument("--nproc", type=int, default=None, help="processes per layout (default: the number of "
                     "accelerators, 2 on a CPU); dp = nproc / (tp*pp*cp) unless a layout names dp")
    lay.add_argument("--micro-batches", type=int, default=None, help="packed rows per step and data-parallel rank "
                     "(default: train.grad_accum, at least the largest pp)")
    lay.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: the device "
                     "table; unknown on a CPU, MFU is then n/a)")
    lay.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    lay.add_argument("--timeout", type=float, default=None, help="seconds per layout before it is stopped")
    lay.add_argument("--out", default="runs/bench-layouts", help="folder for layouts.md/.json/.svg and the runs")
    lay.set_defaults(func=_bench_layouts)

    pl = sub.add_parser("plan", help="predicted memory and step time of every feasible layout, ranked "
                        "(formulas: keyetron.perf.plan)")
    pl.add_argument("--model", required=True, help="a named model config (keye-8b, small, tiny) or a YAML path")
    pl.add_argument("--gpus", type=int, required=True)
    pl.add_argument("--seq", type=int, required=True, help="tokens per packed row (micro-batch)")
    pl.add_argument("--global-batch", type=int, default=None, help="packed rows per step (default: --gpus)")
    pl.add_argument("--calibration", default=None, help="a CostModel file (units flop or seconds) instead of FLOPs")
    pl.add_argument("--gpu-memory-gib", type=float, default=80.0)
    pl.add_argument("--reserve-gib", type=float, default=6.0, help="kept free per GPU (context, NCCL, fragmentation)")
    pl.add_argument("--precision", choices=("bf16", "fp32", "autocast"), default="bf16",
                    help="train.precision of the run (bf16: bf16 weights, fp32 main gradients and masters; "
                    "fp32 and autocast: fp32 weights and gradients); default bf16")
    pl.add_argument("--activation-checkpointing", choices=("auto", "on", "off"), default="auto",
                    help="auto: only where the layout does not fit without it")
    pl.add_argument("--doc-tokens", type=int, default=None, help="document length (default: one document per row)")
    pl.add_argument("--visual-fraction", type=float, default=0.5, help="share of visual tokens (default 0.5)")
    pl.add_argument("--frame-patches", type=int, default=1024, help="ViT patches per image / frame (default 1024)")
    pl.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU peak (default: H100 SXM dense BF16)")
    pl.add_argument("--efficiency", type=float, default=0.5, help="fraction of the peak kernels reach (FLOP costs)")
    pl.add_argument("--nvlink-gbs", type=float, default=360.0, help="per-GPU bandwidth within a node, GB/s")
    pl.add_argument("--network-gbs", type=float, default=45.0, help="per-GPU bandwidth across nodes, GB/s")
    pl.add_argument("--gpus-per-node", type=int, default=8)
    pl.add_argument("--measured", default=None, help="a `bench layouts` layouts.json: prediction error per layout")
    pl.add_argument("--top", type=int, default=20, help="feasible layouts shown (default 20)")
    pl.add_argument("--json", action="store_true", help="print every layout and figure as JSON")
    pl.set_defaults(func=_plan)

    tr = sub.add_parser("train", help="train from a recipe (one process, or each process under torchrun; see recipes/)")
    tr.add_argument("recipe", help="a recipe YAML, e.g. recipes/demo-small.yaml")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key, e.g. --set train.steps=20 (repeatable)")
    for dim in ("tp", "pp", "cp"):
        tr.add_argument(f"--{dim}", type=int, default=None,
                        help=f"{dim} size under torchrun (overrides parallel.{dim}; dp is what the world leaves)")
    tr.set_defaults(func=_train)

    mg = sub.add_parser("merge", help="weighted average of checkpoints of one architecture (see docs/training.md)")
    mg.add_argument("checkpoints", nargs="*", help="keyetron step folders (single-process or distributed) or "
                    "Hugging Face folders, mixed freely")
    mg.add_argument("--weights", default=None, help="one per checkpoint, e.g. 0.5,0.5 (default: equal); positive, "
                    "divided by their sum")
    mg.add_argument("--out", default=None, help="folder for model.safetensors (our names), merge.json, model.yaml")
    mg.add_argument("--hf", default=None, metavar="DIR", help="also write the Hugging Face layout to DIR")
    mg.add_argument("--dtype", default=None, help="auto (the first input's; default) | float32 | bfloat16 | float16")
    mg.add_argument("--config", default=None, help="model config for --hf when no input names one")
    mg.add_argument("--recipe", default=None, help="a merge recipe YAML instead (see recipes/merge.yaml)")
    mg.set_defaults(func=_merge)

    from keyetron.train.generate import add_arguments as add_generate_arguments

    ge = sub.add_parser("generate", help="sampled responses to a JSONL of prompts, with per-token log-probs "
                        "(KV cache; see docs/post_training.md)")
    add_generate_arguments(ge)
    ge.set_defaults(func=_generate)

    from keyetron.launch.submit import add_arguments as add_launch_arguments

    la = sub.add_parser("launch", help="submit a training job to SLURM (sbatch; --dry-run prints the script)")
    add_launch_arguments(la)
    la.set_defaults(func=_launch)

    io = sub.add_parser("io-server", help="serve image / video decoding to training ranks (worker processes)")
    io.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    io.add_argument("--port", type=int, default=7341, help="TCP port (0 picks a free one; it is printed)")
    io.add_argument("--workers", type=int, default=2, help="decode worker processes (default 2)")
    io.add_argument("--queue-size", type=int, default=None,
                    help="decodes that may wait for a worker before clients are told 'busy' (default 2 x workers)")
    io.add_argument("--secret-file", default=None, help="the shared secret (default: $KEYETRON_IO_SECRET)")
    io.add_argument("--lifetime", type=float, default=None, help="stop after this many seconds (default: never)")
    io.set_defaults(func=_io_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # errors the user can fix are one line; anything else is a bug: its traceback
        found = user_error(err)
        if found is None:
            raise
        print(f"keyetron: {found[1]}", file=sys.stderr)
        return found[0]


if __name__ == "__main__":
    sys.exit(main())
