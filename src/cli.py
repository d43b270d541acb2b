"""The ``keyetron`` command: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import json
import sys

from keyetron.config import ConfigError
from keyetron.data.sources import SourceError
from keyetron.data.tokenizer import TokenizerError
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


def _train(args: argparse.Namespace) -> int:
    from keyetron.train.entry import layout_overrides, run
    from keyetron.train.recipe import load_recipe

    return run(load_recipe(args.recipe, args.set + layout_overrides(args.tp, args.pp, args.cp, None)))


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

    tr = sub.add_parser("train", help="train from a recipe (single process; see recipes/)")
    tr.add_argument("recipe", help="a recipe YAML, e.g. recipes/demo-small.yaml")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key, e.g. --set train.steps=20 (repeatable)")
    for dim in ("tp", "pp", "cp"):
        tr.add_argument(f"--{dim}", type=int, default=None,
                        help=f"{dim} size under torchrun (overrides parallel.{dim}; dp is what the world leaves)")
    tr.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"keyetron: config error: {err}", file=sys.stderr)
        return 2
    except (SourceError, CheckpointNotFound, TokenizerError) as err:
        print(f"keyetron: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
