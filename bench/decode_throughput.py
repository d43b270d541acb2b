"""Decode-server throughput against its worker count (a benchmark, not a test).

Generates ``--videos`` synthetic clips (moving shapes with cuts, so plans mix slow and fast
frames), then for each worker count starts a ``DecodeServer`` on loopback and decodes every
clip through ``RemoteDecoder`` from ``2 x workers`` client threads (enough requests in flight
to keep every worker busy). Baseline: the same clips decoded in this process, one at a time.
Throughput counts Slow-Fast-sampled frames (ViT items) and whole videos per second, wall time.
Every worker is single-threaded, so a worker is about one core's work; the client shares the
machine with the workers.

    .venv/bin/python bench/decode_throughput.py --workers 1 2 --out docs/benchmarks/decode-server.md
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from keyetron.data.dataset import MediaConfig, decode_media
from keyetron.data.samples import Part
from keyetron.data.video import write_video
from keyetron.io import DecodeServer, RemoteDecoder

SECRET = os.urandom(32)
MEDIA = MediaConfig()  # the paper profile: 2 fps, 75,000-token budget


def make_videos(root: Path, n: int, frames: int, hw: tuple[int, int], fps: float) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for v in range(n):
        clip = np.empty((frames, *hw, 3), np.uint8)
        for i in range(frames):
            scene = i * 3 // frames  # two hard cuts: some frames become slow again
            clip[i] = rng.integers(0, 40, 3, dtype=np.uint8) + 60 * scene
            x = (i * 7 + v * 13) % (hw[1] - 48)
            clip[i, 40:88, x:x + 48] = (220, 40 + 50 * scene, 30)
        paths.append(write_video(root / f"clip{v:03d}.mp4", clip, fps))
    return paths


def run_local(paths: list[Path]) -> tuple[float, int]:
    start, items = time.perf_counter(), 0
    for p in paths:
        items += len(decode_media(Part("video", p), MEDIA)[1])
    return time.perf_counter() - start, items


def run_server(paths: list[Path], workers: int) -> tuple[float, int, dict]:
    with DecodeServer("127.0.0.1", 0, SECRET, workers=workers, queue_size=2 * workers) as server:
        address = "%s:%d" % server.address
        decoder = RemoteDecoder([address], SECRET, timeout=120, retries=1000)
        todo, lock, items = list(paths), threading.Lock(), [0]

        def client():
            while True:
                with lock:
                    if not todo:
                        return
                    path = todo.pop()
                n = len(decoder.decode(Part("video", path), MEDIA)[1])
                with lock:
                    items[0] += n

        decoder.decode(Part("video", paths[0]), MEDIA)  # connections and worker caches warm
        threads = [threading.Thread(target=client) for _ in range(2 * workers)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        assert decoder.stats.local == 0, decoder.stats  # every clip decoded by the server
        return elapsed, items[0], dict(server.stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--frames", type=int, default=96, help="source frames per clip (at --fps)")
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--size", type=int, nargs=2, default=[360, 640], metavar=("H", "W"))
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_videos(Path(tmp), args.videos, args.frames, tuple(args.size), args.fps)
        rows = []
        elapsed, items = run_local(paths)
        rows.append(("local, in the rank (no server)", "-", elapsed, items))
        for w in args.workers:
            elapsed, items, _stats = run_server(paths, w)
            rows.append((f"io-server, {w} worker{'s' if w > 1 else ''}", str(w), elapsed, items))
    load = (load_before, os.getloadavg()[0])
    base = rows[0][3] / rows[0][2]
    lines = ["| decoder | workers | wall (s) | videos/s | frames/s | vs local |", "|---|---|---|---|---|---|"]
    for name, w, elapsed, items in rows:
        lines.append(f"| {name} | {w} | {elapsed:.2f} | {args.videos / elapsed:.2f} | {items / elapsed:.1f} | "
                     f"{items / elapsed / base:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        cmd = (f".venv/bin/python bench/decode_throughput.py --workers {' '.join(map(str, args.workers))} "
               f"--videos {args.videos} --frames {args.frames} --fps {args.fps:g} --size {args.size[0]} "
               f"{args.size[1]} --out {args.out}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Decode-server throughput\n\nMachine: {os.cpu_count()} cores ({platform.machine()}), torch "
            f"{torch.__version__}, 1-minute load average {load[0]:.1f} before / {load[1]:.1f} after (other jobs "
            f"share the machine when it exceeds the core count). {args.videos} synthetic clips of {args.frames} "
            f"frames at {args.fps:g} fps, {args.size[1]}x{args.size[0]}, Slow-Fast `paper` profile (2 fps sampling: {rows[0][3] // args.videos}"
            f" frames per clip); frames are the sampled frames, resized, normalised and patchified.\n\n"
            f"Reproduce: `{cmd}`\n\n{table}\n\n"
            "How to read it: each worker is a single-threaded process; the client threads (2 per worker) run in\n"
            "the benchmark's process and share the cores with the workers. Local decoding is one process doing\n"
            "the same work inline. A slow frame here is 768 LLM tokens = 3,072 patches of 3x14x14 float32, about\n"
            "7 MB, so the server path copies a few hundred MB/s (worker -> server process -> socket -> client):\n"
            "the price of moving the decode off the rank. The server pays off most when its workers run on cores\n"
            "or hosts the training ranks do not use. On a machine shared with other jobs (load above the core\n"
            "count) the figures swing from run to run.\n")


if __name__ == "__main__":
    main()
