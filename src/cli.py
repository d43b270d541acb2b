"""The ``keyetron`` command: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import json
import sys

from keyetron.config import ConfigError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyetron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("model-info", help="parameter counts of a model config (built on the meta device)")
    info.add_argument("--config", required=True, help="a named config (keye-8b, small, tiny) or a YAML path")
    info.add_argument("--json", action="store_true", help="print JSON with keys total, vit, projector, llm")
    info.set_defaults(func=_model_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"keyetron: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
