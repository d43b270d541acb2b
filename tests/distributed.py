"""The one launcher for multi-process tests: fork N ranks on gloo, collect results or tracebacks.

Forking (not spawning) skips re-importing torch in every rank (a 4-rank test takes ~4 s
instead of ~7 s on a 2-core machine). Each rank runs single-threaded, initialises a gloo
process group on a free loopback port, calls ``fn(rank, world_size, *args)`` and sends
back its return value (picklable) or its traceback. Every rank ends with
``barrier(); destroy_process_group(); os._exit(code)``: exiting through the interpreter
while a DeviceMesh is alive can abort (pytorch#190489) after all work passed.

Usage::

    def body(rank, world, x):
        ...
        return some_tensor.tolist()

    results = run_ranks(4, body, 3)   # list indexed by rank; raises with the failing rank's traceback
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import threading
import traceback
from collections.abc import Callable

DEFAULT_TIMEOUT_S = 240


class RankFailure(AssertionError):
    """A rank raised, timed out or exited badly; the message holds every failing rank's traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, conn, timeout: float) -> None:
    code = 0
    try:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                           "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                           "KEYETRON_DEVICE": "cpu"})
        # A collective that a failed rank never joins errors out instead of hanging for gloo's 30 min.
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
        try:
            result = fn(rank, world, *args)
            conn.send(("ok", pickle.dumps(result)))
        except BaseException:  # report every failure, including assertion errors, to the parent
            conn.send(("error", traceback.format_exc()))
            code = 1
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        code = 1
    finally:
        conn.close()
        os._exit(code)


def _compiled_here() -> bool:
    import sys

    dynamo = sys.modules.get("torch._dynamo.utils")
    return "torchao" in sys.modules or bool(dynamo and any(dynamo.counters.values()))


def run_ranks(world: int, fn: Callable, *args, timeout: float = DEFAULT_TIMEOUT_S) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` forked ranks; return their results by rank."""
    # Forking while other threads run (a thread pool or server thread left by an earlier test)
    # can copy a held lock into the child and hang it; start clean processes then.
    # The same after torch.compile ran or torchao was loaded in this process: a forked rank then
    # hangs in its first all_gather_object (seen after tests/backend's compile and FP8 tests).
    ctx = mp.get_context("fork" if threading.active_count() == 1 and not _compiled_here() else "spawn")
    port = free_port()
    procs, conns = [], []
    for rank in range(world):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_rank_main, args=(rank, world, port, fn, args, child, timeout), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    results: list = [None] * world
    errors: list[str] = []
    for rank, (p, conn) in enumerate(zip(procs, conns)):
        if conn.poll(timeout):
            try:
                status, payload = conn.recv()
            except EOFError:
                status, payload = "error", "rank exited without a result"
        else:
            status, payload = "error", f"no result within {timeout} s (deadlock or a rank died)"
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"--- rank {rank} ---\n{payload}")
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise RankFailure(f"{len(errors)} of {world} ranks failed:\n" + "\n".join(errors))
    bad_exit = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad_exit:
        raise RankFailure(f"ranks exited with non-zero codes {bad_exit} after reporting success")
    return results


__all__ = ["RankFailure", "run_ranks"]
