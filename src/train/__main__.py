"""``python -m keyetron.train --recipe R [--tp T --pp P --cp C] [--set key=value ...]``.

One process, or every process of ``torchrun --nproc-per-node N -m keyetron.train ...``
(data parallelism is whatever the world size leaves after tp x pp x cp). A layout of several
processes started as one fails with the torchrun command to run instead.
"""
from __future__ import annotations

import argparse
import sys

from keyetron.config import ConfigError
from keyetron.train.run import layout_overrides, run, train_argv
from keyetron.train.recipe import load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyetron.train", description=__doc__)
    parser.add_argument("--recipe", required=True, help="a recipe YAML, e.g. recipes/demo-small.yaml")
    for dim in ("tp", "pp", "cp", "dp"):
        parser.add_argument(f"--{dim}", type=int, default=None, help=f"{dim} size (overrides parallel.{dim})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.set + layout_overrides(args.tp, args.pp, args.cp, args.dp))
    except ConfigError as err:
        print(f"keyetron: config error: {err}", file=sys.stderr)
        return 2
    return run(recipe, train_argv(args.recipe, args.tp, args.pp, args.cp, args.dp, args.set))


if __name__ == "__main__":
    sys.exit(main())
