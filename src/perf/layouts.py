"""``keyetron bench layouts``: throughput of real training steps per parallel layout.

    keyetron bench layouts --recipe R --layouts tp2pp1cp1,tp1pp1cp2 --steps 4 [--warmup 1] [--nproc N]
                           [--micro-batches M] [--peak-tflops T] [--set KEY=VALUE ...] [--out DIR]

Every layout is its own torchrun launch of ``keyetron.perf.layout_worker`` (world = tp*pp*cp*dp;
dp = N / (tp*pp*cp) unless the layout names it), which runs the recipe's ``Trainer`` on the
recipe's data (decoded images and videos, packed rows) and times it; what is measured, and how,
is that module's docstring. All layouts take the same ``M`` packed rows per step and
data-parallel rank (default: the recipe's ``train.grad_accum``, raised to the largest pp, since a
pipeline needs a micro-batch per stage), so data-parallel layouts do dp times the work per step:
compare tokens/s per device, not step times.

The bench sets, after the user's ``--set``: ``output_dir`` (``DIR/runs/<layout>``),
``parallel.{tp,pp,cp,dp}``, ``train.steps``, ``train.grad_accum``, a constant learning rate
without warm-up (``schedule.name=constant``, ``schedule.warmup_steps=0``: a few steps cannot hold a
recipe's warm-up, and the rate does not change the work of a step), ``checkpoint.resume=none``,
``data.eval=null``, ``log.tensorboard=false`` and ``log.peak_tflops`` (with ``--peak-tflops``).
Processes get ``OMP_NUM_THREADS=1`` unless the environment sets it (torchrun's own default for
several processes, applied to one-process layouts too).

Writes ``DIR/layouts.md`` (the table), ``DIR/layouts.json`` (every figure; ``keyetron plan
--measured`` reads it) and ``DIR/layouts.svg`` (tokens/s per device and the step time split).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from keyetron.perf.svg import Panel, bar_chart

_LAYOUT = re.compile(r"tp(\d+)pp(\d+)cp(\d+)(?:dp(\d+))?")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int | None = None  # None: what the process count leaves

    @property
    def name(self) -> str:
        return f"tp{self.tp}pp{self.pp}cp{self.cp}" + (f"dp{self.dp}" if self.dp is not None else "")

    def resolve(self, nproc: int) -> Layout:
        """This layout with dp filled in from ``nproc`` processes (an explicit dp fixes the world)."""
        if self.dp is not None:
            return self
        model = self.tp * self.pp * self.cp
        if nproc % model:
            raise ValueError(f"layout {self.name}: tp*pp*cp = {model} does not divide the process count {nproc} "
                             f"(--nproc); use a layout whose tp*pp*cp divides {nproc}, or name dp in it "
                             f"(e.g. {self.name}dp1)")
        return Layout(self.tp, self.pp, self.cp, nproc // model)

    @property
    def world(self) -> int:
        assert self.dp is not None, "resolve() the layout first"
        return self.tp * self.pp * self.cp * self.dp


def parse_layout(text: str) -> Layout:
    """``tp2pp2cp1`` -> Layout(tp=2, pp=2, cp=1); an optional ``dpN`` suffix. Strict: lower case,
    this order, every size a positive integer without leading zeros."""
    m = _LAYOUT.fullmatch(text.strip())
    if not m or any(g is not None and g.startswith("0") for g in m.groups()):
        raise ValueError(f"layout {text!r}: expected tp<N>pp<N>cp<N> with an optional dp<N>, sizes >= 1, "
                         f"e.g. tp2pp2cp1 or tp1pp1cp1dp2")
    tp, pp, cp, dp = m.groups()
    return Layout(int(tp), int(pp), int(cp), int(dp) if dp is not None else None)


def parse_layouts(text: str, nproc: int) -> list[Layout]:
    """A comma-separated list, each resolved against ``nproc`` processes; duplicates are an error."""
    layouts = [parse_layout(part).resolve(nproc) for part in text.split(",") if part.strip()]
    if not layouts:
        raise ValueError("--layouts is empty: give e.g. tp2pp1cp1,tp1pp1cp2")
    names = [lay.name for lay in layouts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--layouts lists {dupes} more than once (after filling in dp from --nproc {nproc})")
    return layouts


def default_nproc() -> int:
    """The accelerators of this machine, or 2 processes on a CPU."""
    import torch

    from keyetron.backend.device import default_device, is_accelerator

    return torch.accelerator.device_count() if is_accelerator(default_device()) else 2


def layout_overrides(layout: Layout, run_dir: Path, steps: int, micro_batches: int,
                     peak_tflops: float | None) -> list[str]:
    sets = [f"output_dir={run_dir}", f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}",
            f"parallel.cp={layout.cp}", f"parallel.dp={layout.dp}", f"train.steps={steps}",
            f"train.grad_accum={micro_batches}", "schedule.name=constant", "schedule.warmup_steps=0",
            "checkpoint.resume=none", "data.eval=null", "log.tensorboard=false"]
    return sets + ([f"log.peak_tflops={peak_tflops}"] if peak_tflops else [])


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the launch's process group, SIGKILL if it is still there after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_layout(layout: Layout, recipe: str, user_sets: list[str], *, warmup: int, steps: int, micro_batches: int,
               out: Path, peak_tflops: float | None = None, timeout_s: float | None = None) -> dict:
    """One torchrun launch; the worker's summary, or {"layout", "error"} when it failed."""
    run_dir = out / "runs" / layout.name
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / "result.json"
    for stale in (result, *run_dir.glob("error.rank*.txt")):
        stale.unlink(missing_ok=True)
    sets = user_sets + layout_overrides(layout, run_dir, warmup + steps, micro_batches, peak_tflops)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={layout.world}",
           "-m", "keyetron.perf.layout_worker", "--recipe", recipe, "--layout", layout.name,
           "--warmup", str(warmup), "--steps", str(steps), "--result", str(result)]
    cmd += [arg for s in sets for arg in ("--set", s)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    log = run_dir / "launch.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        # Its own session, so that a timeout or Ctrl-C stops torchrun and every worker it started.
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = f"timed out after {timeout_s:.0f} s"
        except BaseException:
            _stop(proc)
            raise
    if code != 0 or not result.is_file():
        errors = sorted(run_dir.glob("error.rank*.txt"))  # the workers' tracebacks; the last line says what
        reason = errors[0].read_text().strip().splitlines()[-1] if errors else log.read_text()[-2000:]
        return {"layout": layout.name, "tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "dp": layout.dp,
                "world": layout.world, "error": f"{reason} (exit {code}; log {log})"}
    # Other work on the machine slows every layout: the load average says whether there was any.
    return json.loads(result.read_text()) | {"wall_s": time.perf_counter() - t0, "load_avg_1m": os.getloadavg()[0]}


# -- reporting --------------------------------------------------------------------------------

def _num(x: float | None, fmt: str = "{:.3g}") -> str:
    return "n/a" if x is None else fmt.format(x)


def format_table(results: list[dict]) -> str:
    head = ("| layout | processes | tokens/s per device | step (s) | MFU | TFLOP/s per device (ViT / LLM per step, "
            "TFLOP) | peak memory per rank, GiB (max / min) | pipeline bubble: measured (analytic 1F1B) | "
            "data wait per step, s (share of step) | loss |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        if "error" in r:
            reason = r["error"].splitlines()[0].replace("|", "/")
            lines.append(f"| {r['layout']} | {r['world']} | failed: {reason} |" + " |" * 7)
            continue
        bubble = "no pipeline" if r["pp"] == 1 else (f"{r['bubble_measured']:.1%} ({r['bubble_analytic']:.1%})")
        lines.append(
            f"| {r['layout']} | {r['world']} | {r['tokens_per_s_per_device']:.4g} | {r['step_s']:.3f} | "
            f"{_num(r['mfu'], '{:.1%}')} | {r['tflops_per_device']:.3g} ({r['vit_tflop_per_step']:.3g} / "
            f"{r['llm_tflop_per_step']:.3g}) | {r['memory_max_gib']:.2f} / {r['memory_min_gib']:.2f} | {bubble} | "
            f"{r['data_wait_s']:.3f} ({r['data_wait_fraction']:.0%}) | {r['loss']:.3f} |")
    return "\n".join(lines)


def write_chart(path: Path, results: list[dict], title: str) -> None:
    ok = [r for r in results if "error" not in r]
    labels = [r["layout"] for r in ok]
    idle = [r["pipeline_idle_s"] or 0.0 for r in ok]
    rest = [r["step_s"] - r["data_wait_s"] - i for r, i in zip(ok, idle)]
    panels = [Panel("tokens/s per device", [("tokens/s per device", [r["tokens_per_s_per_device"] for r in ok])]),
              Panel("step time (s)", [("compute + communication", rest), ("data wait", [r["data_wait_s"] for r in ok]),
                                      ("pipeline idle (mean over ranks)", idle)])]
    path.write_text(bar_chart(title, labels, panels))


def write_report(out: Path, results: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "layouts.json").write_text(json.dumps(meta | {"layouts": results}, indent=2))
    first = next((r for r in results if "error" not in r), {})
    kind = first.get("memory_kind", "peak memory")
    text = (f"# Throughput per layout\n\nCommand: `{meta['command']}`\n\n"
            f"Machine: {meta['host']['cpus']} CPUs, {first.get('device', '?')}, torch {meta['host']['torch']}; "
            f"model `{first.get('model', '?')}`, {meta['micro_batches']} packed rows of {meta['row_tokens']} tokens "
            f"per step and data-parallel rank; {meta['warmup']} warm-up + {meta['steps']} measured steps.\n\n"
            + format_table(results) +
            f"\n\nTokens are real (non-padding) tokens; FLOPs are counted per document and per ViT frame "
            f"(keyetron.flops); MFU needs a peak (`--peak-tflops`, or a known accelerator). Peak memory is "
            f"{kind}. Pipeline bubble measured = 1 - (stage compute / schedule span) per rank, averaged; analytic = "
            f"(pp-1)/(m+pp-1) for m micro-batches. Data wait = seconds per step inside the loader (slowest rank).\n"
            + "\nHost load (1-minute average) at the end of each layout: "
            + ", ".join(f"{r['layout']} {r['load_avg_1m']:.1f}" for r in results if "load_avg_1m" in r)
            + " (above the layout's process count: other work shared the machine).\n")
    (out / "layouts.md").write_text(text)
    write_chart(out / "layouts.svg", results, f"{first.get('model', '')}: throughput per layout")


def _exit_on_sigterm(signum, _frame):
    raise SystemExit(128 + signum)


def command_line(args, nproc: int, micro_batches: int) -> str:
    """The command that reproduces this run, every default spelled out."""
    words = ["keyetron", "bench", "layouts", "--recipe", args.recipe, "--layouts", args.layouts, "--steps",
             str(args.steps), "--warmup", str(args.warmup), "--nproc", str(nproc),
             "--micro-batches", str(micro_batches)]
    words += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    words += [w for s in args.set for w in ("--set", s)] + ["--out", str(args.out)]
    return shlex.join(words)


def run(args) -> int:
    """The ``keyetron bench layouts`` command (arguments from ``keyetron.cli``)."""
    import torch

    from keyetron.train.recipe import load_recipe

    nproc = args.nproc or default_nproc()
    try:
        layouts = parse_layouts(args.layouts, nproc)
    except ValueError as err:
        print(f"keyetron: {err}", file=sys.stderr)
        return 2
    recipe = load_recipe(args.recipe, args.set)
    micro_batches = args.micro_batches or max(recipe.train.grad_accum, *(lay.pp for lay in layouts))
    out = Path(args.out)
    for layout in layouts:  # fail early, naming the file, on what every process would reject
        load_recipe(args.recipe, args.set + layout_overrides(layout, out / "runs" / layout.name,
                                                             args.warmup + args.steps, micro_batches, args.peak_tflops))
    results = []
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that the running launch is stopped too
    try:
        for layout in layouts:
            print(f"bench layouts: {layout.name} ({layout.world} processes) ...", file=sys.stderr, flush=True)
            r = run_layout(layout, args.recipe, args.set, warmup=args.warmup, steps=args.steps,
                           micro_batches=micro_batches, out=out, peak_tflops=args.peak_tflops, timeout_s=args.timeout)
            if "error" in r:
                print(f"bench layouts: {layout.name} failed: {r['error']}", file=sys.stderr)
            results.append(r)
    finally:
        signal.signal(signal.SIGTERM, previous)
    meta = {"command": command_line(args, nproc, micro_batches), "recipe": args.recipe, "sets": args.set,
            "nproc": nproc,
            "micro_batches": micro_batches, "row_tokens": recipe.data.loader.row_tokens, "warmup": args.warmup,
            "steps": args.steps, "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                                          "torch": torch.__version__}}
    write_report(out, results, meta)
    print(format_table(results))
    print(f"wrote {out / 'layouts.md'}, {out / 'layouts.json'}, {out / 'layouts.svg'}", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


__all__ = ["Layout", "default_nproc", "format_table", "parse_layout", "parse_layouts", "run", "run_layout",
           "write_report"]
