"""One GPU acceptance run: kernel tests, real training steps, attention TFLOP/s; one JSON and one table.

    python bench/gpu/acceptance.py OUTDIR [--smoke] [--budget-s S] [--work DIR] [--peak-tflops T]

(``bench/gpu/acceptance.sh`` installs the project and the carried wheels first, then calls this.)

Parts, each in its own process with its own time limit, so that a crash, an OOM or a hang in
one is recorded (with a one-line reason) and the next still runs:

3. attention (first: short, and it says early whether the GPU works):
   ``attention_tflops.py``: flash_attn / torch_varlen / sdpa at 8K and 32K documents, fwd and
   fwd+bwd, bf16; also the device and library versions.
1. ``pytest tests/backend`` with ``KEYETRON_DEVICE`` set to the GPU (the tests' conftest
   defaults to the CPU, which would skip the GPU kernel tests): pass / fail / skip counts.
2. training: ``python -m keyetron.perf.layout_worker`` (one process, no torchrun) runs the
   recipe's ``Trainer`` for warm-up + measured optimizer steps on the demo dataset (decoded
   images and videos, packed rows) and reports tokens/s, step time, loader time, MFU, peak
   allocated memory. Workloads: the ``small`` demo recipe (2K rows), and a keye-8b slice (the
   real ViT, projector and widths, 4 of the 36 LLM layers; its config YAML is written to
   OUTDIR) at 8K and 32K-token rows (32K recomputes the ViT: activation checkpointing).
   Variants: ``train.precision: bf16`` alone, with ``train.compile``, with ``train.compile`` and
   ``train.fp8``, with ``train.fp8``; run in the order ``ORDER`` gives, until the budget is
   spent. A variant whose key the recipe does not know yet is recorded as unsupported, not run.

Time: every part's limit is its cap or what the budget leaves (minus a reserve for the
reports), whichever is smaller; a variant that cannot get ``MIN_VARIANT_S`` is recorded as
not run. The demo dataset is generated on the CPU while the GPU parts run. Reports are
rewritten after every part. Scratch (demo data, run folders, logs) goes to --work; OUTDIR gets
only acceptance.json, acceptance.md, acceptance.log and the slice config.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from report import write_reports

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESERVE_S = 20  # left at the end: a stopped part's shutdown and the reports
MIN_VARIANT_S = 30


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What differs between a GPU run and the CPU smoke run (same code paths)."""

    slice_base: str  # model config the slice is cut from
    slice_layers: int
    rows: tuple[tuple[str, int], ...]  # (label, row tokens) of the slice workloads
    small_row_tokens: int | None  # None: the recipe's
    demo_train: int
    warmup: int
    steps: int
    caps: dict  # seconds per part
    media: dict  # the slice's data.media overrides


GPU = Sizes("keye-8b", 4, (("8K", 8192), ("32K", 32768)), None, 400, 2, 3,
            {"attention": 90, "tests": 150, "small": 75, "slice-8K": 100, "slice-32K": 140, "compile_extra": 90},
            {})
# Smoke: tiny widths, a few hundred tokens per row, the demo-small media budgets (documents fit the rows).
SMOKE = Sizes("tiny", 2, (("8K", 512), ("32K", 1024)), 512, 60, 1, 1,
              {"attention": 300, "tests": 900, "small": 400, "slice-8K": 300, "slice-32K": 300, "compile_extra": 300},
              {"image_max_tokens": 16, "video_total_tokens": 192, "video_fps": 1.0})

VARIANTS = {"bf16": (), "bf16+compile": ("train.compile=true",), "bf16+compile+fp8": ("train.compile=true", "train.fp8=true"),
            "bf16+fp8": ("train.fp8=true",)}
# Run order, until the budget is spent: a quick sanity run, the bf16 baselines, then every variant
# of the 8K slice (the pre-training row length), of the 32K slice, and of `small` last (a
# 192-wide model says little about compile or FP8 speed). FP8 without compile comes after FP8
# with it: torchao needs compile to fuse its casts, so eager FP8 mostly shows that FP8 runs.
ORDER = (("small", "bf16"), ("8K", "bf16"), ("32K", "bf16"),
         ("8K", "bf16+compile"), ("8K", "bf16+compile+fp8"), ("8K", "bf16+fp8"),
         ("32K", "bf16+compile"), ("32K", "bf16+compile+fp8"), ("32K", "bf16+fp8"),
         ("small", "bf16+compile"), ("small", "bf16+compile+fp8"), ("small", "bf16+fp8"))


class Run:
    """The budget, the log and the result being built."""

    def __init__(self, args):
        self.args, self.out, self.work = args, Path(args.out), Path(args.work)
        self.sizes = SMOKE if args.smoke else GPU
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.log_path = self.out / "acceptance.log"
        self.log_path.write_text("")
        self.result = {"format": "keyetron-gpu-acceptance/1", "smoke": args.smoke,
                       "command": shlex.join([sys.executable, *sys.argv]),
                       "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       "budget_s": args.budget_s, "wall_s": 0.0, "install": os.environ.get("ACCEPTANCE_INSTALL"),
                       "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": sys.version.split()[0]},
                       "training": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, cap: float) -> float:
        return min(cap, self.left() - RESERVE_S)

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def attach_log(self, title: str, path: Path, lines: int = 60) -> None:
        """The last lines of a part's own log, into acceptance.log (the scratch folder stays on the machine)."""
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else ["(no log)"]
        with open(self.log_path, "a") as f:
            f.write(f"---- {title}: last {len(text)} lines of {path}\n" + "\n".join(text) + "\n----\n")

    def save(self) -> None:
        self.result["wall_s"] = time.monotonic() - self.t0
        write_reports(self.out, self.result)


def run_child(cmd: list[str], log: Path, timeout: float, env: dict | None = None,
              interrupt_first: bool = False) -> tuple[int | str, float]:
    """Run ``cmd`` in its own session with output to ``log``; (exit code or 'timeout', seconds).
    On timeout the whole process group gets SIGTERM, then SIGKILL 10 s later; ``interrupt_first``
    sends SIGINT 10 s before that (pytest then still writes its report of the tests done)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            code = "timeout"
            signals = [(signal.SIGINT, 10)] if interrupt_first else []
            for sig, wait in signals + [(signal.SIGTERM, 10), (signal.SIGKILL, 30)]:
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
    return code, time.perf_counter() - t0


def one_line(text: str, limit: int = 300) -> str:
    """The line that says what went wrong: the last 'SomeError: ...' line, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln)]
    line = (errors or lines or ["(no output)"])[-1]
    return line if len(line) <= limit else line[:limit] + " ..."


def child_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


# -- parts ---------------------------------------------------------------------------------------

def run_attention(run: Run) -> None:
    limit = run.limit(run.sizes.caps["attention"])
    path, log = run.work / "attention.json", run.work / "attention.log"
    run.say(f"attention kernels (limit {limit:.0f} s) ...")
    cmd = [sys.executable, str(HERE / "attention_tflops.py"), "--json", str(path)] + (["--smoke"] if run.args.smoke else [])
    code, seconds = run_child(cmd, log, limit, child_env(**({} if run.args.smoke else {"KEYETRON_DEVICE": "cuda"})))
    result = json.loads(path.read_text()) if path.is_file() else {}
    run.result["device_info"] = result.pop("device_info", None)
    status = "ok" if code == 0 else ("timeout" if code == "timeout" else "failed")
    result.update(status=status, seconds=seconds)
    if status != "ok":
        result["reason"] = (f"timed out after {limit:.0f} s" if code == "timeout"
                            else f"exit {code}: {one_line(log.read_text(errors='replace'))}")
    run.result["attention"] = result
    run.attach_log("attention", log)
    run.say(f"attention: {status} in {seconds:.0f} s" + (f" ({result['reason']})" if status != "ok" else ""))


def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    failures, skips = [], []
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag, into in (("failure", failures), ("error", failures), ("skipped", skips)):
            for node in case.findall(tag):
                into.append({"test": name, "message": one_line(node.get("message") or node.text or tag, 200)})
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "failures": failures, "skips": skips}


def run_tests(run: Run) -> None:
    limit = run.limit(run.sizes.caps["tests"]) - 10  # its SIGINT comes 10 s before the usual stop
    junit, log = run.work / "pytest.xml", run.work / "pytest.log"
    cmd = [sys.executable, "-m", "pytest", "tests/backend", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    env_note = "KEYETRON_DEVICE unset (CPU)" if run.args.smoke else "KEYETRON_DEVICE=cuda"
    run.say(f"pytest tests/backend ({env_note}; limit {limit:.0f} s) ...")
    code, seconds = run_child(cmd, log, limit, child_env(**({} if run.args.smoke else {"KEYETRON_DEVICE": "cuda"})),
                              interrupt_first=True)
    tests = {"command": "pytest tests/backend", "env": env_note, "seconds": seconds, "exit": code}
    if junit.is_file():
        tests.update(parse_junit(junit))
    if code == "timeout":
        tests.update(status="timeout", reason=f"timed out after {limit:.0f} s")
    elif not junit.is_file():
        tests.update(status="failed", reason=f"exit {code}, no report: {one_line(log.read_text(errors='replace'))}")
    else:
        tests["status"] = "passed" if code == 0 and not tests["failed"] and not tests["errors"] else "failed"
    run.result["tests"] = tests
    run.attach_log("pytest", log, 80)
    counts = ", ".join(f"{tests.get(k, '?')} {k}" for k in ("passed", "failed", "errors", "skipped"))
    run.say(f"pytest: {tests['status']} ({counts}) in {seconds:.0f} s")


def start_demo(run: Run) -> subprocess.Popen:
    folder = run.work / "demo"
    cmd = [sys.executable, "-m", "keyetron.cli", "data", "make-demo", str(folder),
           "--train-size", str(run.sizes.demo_train), "--eval-size", "10"]
    with open(run.work / "demo.log", "w") as log:  # the child keeps its own copy of the handle
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(OMP_NUM_THREADS="1"), start_new_session=True)


def write_slice_config(run: Run) -> Path:
    """The keye-8b slice (tiny in smoke): the base config with ``slice_layers`` LLM layers."""
    from keyetron.model.config import config_yaml, load_model_config

    s = run.sizes
    base = load_model_config(s.slice_base)
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_layers=s.slice_layers),
                              name=f"{s.slice_base}-slice-{s.slice_layers}l")
    path = run.out / f"{cfg.name}.yaml"
    path.write_text(f"# {s.slice_base} with {s.slice_layers} of its {base.text.num_layers} LLM layers "
                    "(bench/gpu/acceptance.py): the whole ViT and projector, real widths and vocabulary.\n"
                    + config_yaml(cfg))
    run.result["slice_config"] = path.name
    run.result["slice_note"] = f"{s.slice_base}: every width, the whole ViT, {s.slice_layers} of " \
                               f"{base.text.num_layers} LLM layers"
    return path


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    recipe: Path
    sets: tuple[str, ...]
    cap: float


def workloads(run: Run, slice_config: Path) -> dict[str, Workload]:
    from keyetron.train.recipe import load_recipe

    s, demo = run.sizes, run.work / "demo" / "train.jsonl"
    small = REPO / "recipes" / "demo-small.yaml"
    small_sets = (f"data.sources=[{demo}]",) + ((f"data.loader.row_tokens={s.small_row_tokens}",)
                                                if s.small_row_tokens else ())
    row = load_recipe(small, list(small_sets)).data.loader.row_tokens
    found = {"small": Workload(f"small, demo-small recipe, {row}-token rows", small, small_sets, s.caps["small"])}
    slice_recipe = run.work / "slice-recipe.yaml"
    slice_recipe.write_text(json.dumps({  # JSON is YAML
        "name": "acceptance-slice", "model": {"config": str(slice_config)},
        "data": {"sources": [str(demo)], "media": s.media, "loader": {"row_tokens": 8192}},
        "optim": {"lr": 1.0e-4, "weight_decay": 0.01, "betas": [0.9, 0.95], "clip_grad": 1.0}}, indent=2))
    for label, row in s.rows:
        sets = [f"data.loader.row_tokens={row}", f"data.loader.buffer_docs={max(256, row // 64)}"]
        if label == "32K":  # ~100K ViT patches per row: their activations alone would need ~90 GB
            sets.append("model.activation_checkpointing=[vit]")
        found[label] = Workload(f"{s.slice_base} slice, {row}-token rows", slice_recipe, tuple(sets),
                                s.caps[f"slice-{label}"])
    return found


def common_sets(run: Run, run_dir: Path) -> list[str]:
    steps = run.sizes.warmup + run.sizes.steps
    sets = [f"output_dir={run_dir}", "train.precision=bf16", f"train.steps={steps}", "train.grad_accum=1",
            "schedule.name=constant", "schedule.warmup_steps=0", "checkpoint.resume=none", "data.eval=null",
            "log.tensorboard=false"]
    return sets + ([f"log.peak_tflops={run.args.peak_tflops}"] if run.args.peak_tflops else [])


def unsupported(recipe: Path, sets: list[str]) -> tuple[str, str] | None:
    """None when the recipe loads with these overrides; else (status, one-line reason)."""
    from keyetron.config import ConfigError
    from keyetron.train.recipe import load_recipe

    try:
        load_recipe(recipe, sets)
    except (ConfigError, ValueError) as err:
        text = str(err)
        m = re.search(r"unknown key\(s\) \[([^\]]*)\] for TrainSection", text)
        missing = re.findall(r"'(compile|fp8)'", m.group(1)) if m else []
        if missing:
            return "unsupported", f"this tree's recipe has no {' / '.join('train.' + k for k in missing)} key yet"
        return "failed", f"recipe rejected: {one_line(text)}"
    return None


def summarize_variant(summary: dict) -> dict:
    compute_s = max(summary["step_s"] - summary["data_wait_s"], 1e-9)
    per_step_flops = summary["tflop_per_step"] * 1e12
    peak = summary.get("peak_flops")
    return {"tokens_per_s": summary["tokens_per_s_per_device"], "step_s": summary["step_s"],
            "data_wait_s": summary["data_wait_s"],
            "tokens_per_s_without_data_wait": summary["tokens_per_step"] / compute_s,
            "mfu": summary["mfu"], "mfu_without_data_wait": per_step_flops / compute_s / peak if peak else None,
            "tflops": summary["tflops_per_device"], "peak_memory_gib": summary["memory_max_gib"],
            "tokens_per_step": summary["tokens_per_step"], "packing_efficiency": summary["packing_efficiency"],
            "loss": summary["loss"]}


def run_variant(run: Run, w: Workload, variant: str, extra: tuple[str, ...], index: int) -> dict:
    record = {"workload": w.name, "variant": variant}
    run_dir = run.work / "runs" / f"{index:02d}"
    run_dir.mkdir(parents=True, exist_ok=True)
    sets = list(w.sets) + common_sets(run, run_dir) + list(extra)
    record["sets"] = sets
    refused = unsupported(w.recipe, sets)
    if refused:
        run.say(f"train {w.name} {variant}: {refused[0]}: {refused[1]}")
        return record | {"status": refused[0], "reason": refused[1]}
    cap = w.cap + (run.sizes.caps["compile_extra"] if "compile" in variant else 0)
    limit = run.limit(cap)
    if limit < min(MIN_VARIANT_S, cap):
        run.say(f"train {w.name} {variant}: not run ({run.left():.0f} s of the budget left)")
        return record | {"status": "not run", "reason": f"time budget spent ({run.left():.0f} s left)"}
    result, log = run_dir / "result.json", run_dir / "worker.log"
    cmd = [sys.executable, "-m", "keyetron.perf.layout_worker", "--recipe", str(w.recipe), "--layout", "tp1pp1cp1dp1",
           "--warmup", str(run.sizes.warmup), "--steps", str(run.sizes.steps), "--result", str(result)]
    cmd += [a for s in sets for a in ("--set", s)]
    env = child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                    PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
                    TORCHINDUCTOR_CACHE_DIR=str(run.work / "inductor"))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # one process: no process group
        env.pop(key, None)
    record["env"] = {k: env[k] for k in ("OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF")}
    run.say(f"train {w.name} {variant} (limit {limit:.0f} s) ...")
    code, seconds = run_child(cmd, log, limit, env)
    record["wall_s"] = seconds
    run.attach_log(f"train {w.name} {variant}", log, 40)
    if code == 0 and result.is_file():
        summary = json.loads(result.read_text())
        record |= {"status": "ok", **summarize_variant(summary), "summary": summary}
        run.say(f"train {w.name} {variant}: {record['tokens_per_s']:.4g} tokens/s, step {record['step_s']:.3f} s "
                f"(data {record['data_wait_s']:.3f} s), MFU {record['mfu'] or 0:.1%}, "
                f"{record['peak_memory_gib']:.1f} GiB, {seconds:.0f} s")
        return record
    error_file = run_dir / "error.rank0.txt"
    text = error_file.read_text(errors="replace") if error_file.is_file() else log.read_text(errors="replace")
    reason = f"timed out after {limit:.0f} s" if code == "timeout" else one_line(text)
    status = "timeout" if code == "timeout" else ("out of memory" if "out of memory" in reason.lower() else "failed")
    run.say(f"train {w.name} {variant}: {status}: {reason}")
    return record | {"status": status, "reason": reason}


def run_training(run: Run, demo: subprocess.Popen) -> None:
    try:
        code = demo.wait(timeout=max(run.limit(120), 1))
    except subprocess.TimeoutExpired:
        os.killpg(demo.pid, signal.SIGKILL)
        code = "timeout"
    run.attach_log("make-demo", run.work / "demo.log", 10)
    if code != 0:
        run.say(f"demo dataset: make-demo failed ({code}); no training part")
        run.result["training"] = [{"workload": "all", "variant": "all", "status": "failed",
                                   "reason": f"make-demo: {code}: {one_line((run.work / 'demo.log').read_text())}"}]
        return
    run.say("demo dataset ready")
    slice_config = write_slice_config(run)
    found = workloads(run, slice_config)
    for index, (workload, variant) in enumerate(ORDER, 1):
        run.result["training"].append(run_variant(run, found[workload], variant, VARIANTS[variant], index))
        run.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder: acceptance.json, acceptance.md, acceptance.log, slice config")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: every part's code path")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for everything (default 440; smoke 3000)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-GPU peak for MFU (default: the trainer's table, 989 for H100/H200 SXM bf16; "
                             "smoke: 1, nominal)")
    parser.add_argument("--parts", default="attention,tests,training", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    args.budget_s = args.budget_s or (3000.0 if args.smoke else 440.0)
    if args.smoke and args.peak_tflops is None:
        args.peak_tflops = 1.0
    if args.smoke:
        os.environ.setdefault("KEYETRON_DEVICE", "cpu")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.work = args.work or tempfile.mkdtemp(prefix="keyetron-acceptance-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    run = Run(args)
    run.result["peak_note"] = ("MFU uses a nominal 1 TFLOP/s peak (smoke run: meaningless)." if args.smoke else
                               "MFU = counted FLOPs / (step time x peak); peak: "
                               + (f"{args.peak_tflops} TFLOP/s (--peak-tflops)" if args.peak_tflops else
                                  "the trainer's table (dense bf16, 989 TFLOP/s for H100/H200 SXM)")
                               + ", also for the FP8 variants (their FLOPs are the same model FLOPs).")
    parts = set(args.parts.split(","))
    run.say(f"acceptance run: parts {sorted(parts)}, budget {args.budget_s:.0f} s, work {args.work}, out {args.out}")
    demo = start_demo(run) if "training" in parts else None
    try:
        if "attention" in parts:
            run_attention(run)
            run.save()
        if "tests" in parts:
            run_tests(run)
            run.save()
        if demo is not None:
            run_training(run, demo)
    finally:
        if demo is not None and demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        run.save()
    run.say(f"wrote {run.out / 'acceptance.json'} and {run.out / 'acceptance.md'}")
    print((run.out / "acceptance.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
