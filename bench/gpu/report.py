"""The acceptance run's two reports: ``acceptance.json`` (every figure) and ``acceptance.md`` (the tables)."""
from __future__ import annotations

import json
from pathlib import Path


def _num(x, fmt: str = "{:.3g}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def tests_section(tests: dict | None) -> list[str]:
    lines = ["## 1. GPU kernel tests (`pytest tests/backend`)", ""]
    if not tests:
        return lines + ["not run", ""]
    lines += [f"`{tests['command']}` ({tests.get('env', '')}): **{tests['status']}** in {tests['seconds']:.0f} s", "",
              "| passed | failed | errors | skipped |", "|---|---|---|---|",
              (f"| {tests.get('passed', 'n/a')} | {tests.get('failed', 'n/a')} | {tests.get('errors', 'n/a')} | "
              f"{tests.get('skipped', 'n/a')} |"), ""]
    if tests.get("reason"):
        lines += [f"Reason: {_cell(tests['reason'])}", ""]
    for key, title in (("failures", "Failed"), ("skips", "Skipped")):
        if tests.get(key):
            lines += [f"{title}:", ""] + [f"- `{t['test']}`: {_cell(t['message'])}" for t in tests[key]] + [""]
    return lines


TRAIN_HEAD = ("| workload | variant | status | tokens/s per GPU | step (s) | data wait (s) | tokens/s without data wait "
              "| MFU | MFU without data wait | TFLOP/s | peak memory (GiB) | tokens per step (packing) | loss "
              "| wall (s) |")


def training_section(training: list[dict], peak_note: str) -> list[str]:
    lines = ["## 2. Training steps on one GPU (`keyetron.perf.layout_worker`: the recipe's Trainer, real data)", "",
             TRAIN_HEAD, "|" + "---|" * 14]
    for r in training:
        head = f"| {r['workload']} | {r['variant']} | {r['status']}"
        if r["status"] != "ok":
            lines.append(f"{head}: {_cell(r.get('reason', ''))} |" + " |" * 10 + f" {_num(r.get('wall_s'), '{:.0f}')} |")
            continue
        lines.append(
            f"{head} | {r['tokens_per_s']:.4g} | {r['step_s']:.3f} | {r['data_wait_s']:.3f} | "
            f"{r['tokens_per_s_without_data_wait']:.4g} | {_num(r['mfu'], '{:.1%}')} | "
            f"{_num(r['mfu_without_data_wait'], '{:.1%}')} | {r['tflops']:.3g} | {r['peak_memory_gib']:.2f} | "
            f"{r['tokens_per_step']:.0f} ({r['packing_efficiency']:.1%}) | {r['loss']:.3f} | {r['wall_s']:.0f} |")
    kind = next((r["summary"]["memory_kind"] for r in training if r["status"] == "ok"), "n/a")
    lines += ["", ("Tokens are real (non-padding) LLM tokens per step; FLOPs are `keyetron.flops` (LLM linear on real "
              "tokens, attention per document, ViT per frame of patches; recomputation by activation checkpointing "
              f"is not counted). {peak_note} Step time runs from the loader to the optimizer update (device "
              "synchronised), averaged over the measured steps; the loader decodes the demo's images and videos "
              "on the CPU inside the step, so 'without data wait' (step minus loader time) is the GPU's own rate; "
              "it packs a buffer of `data.loader.buffer_docs` documents at a time, so a measured step waits for a "
              "whole fill or for nothing (the JSON has each run's step_s_min / step_s_max). Peak memory: "
              f"{kind}, over the measured steps."), ""]
    return lines


ATTN_HEAD = "| case | kernel | fwd (ms) | fwd TFLOP/s | fwd+bwd (ms) | fwd+bwd TFLOP/s | rel. err vs first (out / dQ) |"


def attention_section(attention: dict | None) -> list[str]:
    lines = ["## 3. Attention kernels (causal, packed varlen, `keyetron.backend.attention.varlen_attention`)", ""]
    if not attention:
        return lines + ["not run", ""]
    if attention.get("status") not in (None, "ok"):
        lines += [f"Status: {attention['status']}: {_cell(attention.get('reason', ''))}", ""]
    shape = attention.get("shape", {})
    lines += [(f"{attention.get('dtype', '?')}, {shape.get('heads')} query heads, {shape.get('kv_heads')} KV heads, "
              f"head_dim {shape.get('head_dim')}; kernels here: {attention.get('kernels')}, not available: "
              f"{attention.get('kernels_unavailable')}. FLOPs per document: causal forward 2·H·D·len², "
              "forward+backward 3x that."), "", ATTN_HEAD, "|---|---|---|---|---|---|---|"]
    for c in attention.get("cases", []):
        if "error" in c:
            lines.append(f"| {c['case']} | {c['kernel']} | failed: {_cell(c['error'])} | | | | |")
            continue
        err = (f"{c['out_rel_err']:.1e} / {c['dq_rel_err']:.1e} ({c['compared_with']})" if "compared_with" in c
               else "(baseline)")
        lines.append(f"| {c['case']} | {c['kernel']} | {c['forward_ms']:.2f} | {c['tflops_forward']:.3g} | "
                     f"{c['forward_backward_ms']:.2f} | {c['tflops_forward_backward']:.3g} | {err} |")
    return lines + [""]


def markdown(result: dict) -> str:
    dev = result.get("device_info") or {}
    lines = [f"# GPU acceptance: {dev.get('device', '?')}", ""]
    if result["smoke"]:
        lines += [("**SMOKE RUN on a CPU with tiny sizes: these figures say that every part runs, nothing about a "
                   "GPU.**"), ""]
    lines += [(f"Command: `{result['command']}`; started {result['started']}, {result['wall_s']:.0f} s of a "
               f"{result['budget_s']:.0f} s budget; torch {dev.get('torch', '?')} (CUDA {dev.get('torch_cuda')}), "
               f"Python {dev.get('python', '?')}, packages {dev.get('packages', {})}; FP8: {dev.get('fp8', '?')}."),
              ""]
    if result.get("install"):
        lines += [f"Install: {result['install']}", ""]
    lines += tests_section(result.get("tests"))
    lines += training_section(result.get("training", []), result.get("peak_note", ""))
    lines += attention_section(result.get("attention"))
    if result.get("slice_config"):
        lines += [f"Slice model config: `{result['slice_config']}` ({result.get('slice_note', '')})", ""]
    return "\n".join(lines)


def write_reports(out: Path, result: dict) -> None:
    """Both files, replaced whole (a run cut short still leaves the latest complete state)."""
    for name, text in (("acceptance.json", json.dumps(result, indent=2)), ("acceptance.md", markdown(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(out / name)
