"""The ``keyetron`` command: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import json
import sys

from keyetron.config import ConfigError
from keyetron.data.sources import SourceError
from keyetron.data.tokenizer import TokenizerError
from keyetron.parallel.balance import CalibrationError
from keyetron.train.checkpoint import CheckpointNotFound


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
    print(json.dumps(summary.to_dict(), indent=2, default=str))
    return 0


def _bench_balance(args: argparse.Namespace) -> int:
    from keyetron.bench.balance import format_report, run_bench
    from keyetron.parallel.balance import CostModel

    model = CostModel.load(args.calibration) if args.calibration else CostModel.from_flops(args.config)
    report = run_bench(args.ranks, args.row_tokens, args.samples, args.seed, args.rows_per_rank, model)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _train(args: argparse.Namespace) -> int:
    from keyetron.train.entry import layout_overrides, run
    from keyetron.train.recipe import load_recipe

    return run(load_recipe(args.recipe, args.set + layout_overrides(args.tp, args.pp, args.cp, None)))


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

    tr = sub.add_parser("train", help="train from a recipe (single process; see recipes/)")
    tr.add_argument("recipe", help="a recipe YAML, e.g. recipes/demo-small.yaml")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key, e.g. --set train.steps=20 (repeatable)")
    for dim in ("tp", "pp", "cp"):
        tr.add_argument(f"--{dim}", type=int, default=None,
                        help=f"{dim} size under torchrun (overrides parallel.{dim}; dp is what the world leaves)")
    tr.set_defaults(func=_train)

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
    except ConfigError as err:
        print(f"keyetron: config error: {err}", file=sys.stderr)
        return 2
    except (SourceError, CheckpointNotFound, TokenizerError, CalibrationError) as err:
        print(f"keyetron: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
