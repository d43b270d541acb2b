"""``keyetron io-server``: image and video decoding for training ranks, in a pool of worker processes.

Each connection is authenticated (see ``protocol``) and then sends requests

    {"op": "decode", "id": 7, "kind": "image" | "video", "path": "/data/a.mp4",
     "media": {MediaConfig fields}, "patch_size": 14}
    {"op": "stats", "id": 8}

and gets one reply per request, in completion order, matched by ``id``:

    {"id": 7, "status": "ok", "entry": ..., "grids": [[1, h, w], ...]} + one pixel tensor per grid
    {"id": 7, "status": "busy"}                   the queue is full: retry elsewhere or later
    {"id": 7, "status": "media_error", "path", "reason"}   the file is unusable (a counted skip)
    {"id": 7, "status": "error", "error"}         the decoder failed unexpectedly
    {"status": "bad_request", "error"}            then the connection is closed

Admission is bounded: at most ``workers + queue_size`` decodes are running or waiting; a
request beyond that is answered "busy" at once instead of being buffered, so a slow server
pushes back on its clients rather than growing without bound.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from keyetron.data.dataset import MediaConfig
from keyetron.io.protocol import (KINDS, MAX_REQUEST_BYTES, AuthenticationError, Channel, ProtocolError,
                                  entry_to_json, load_secret, server_handshake)

log = logging.getLogger("keyetron.io")
_MEDIA_FIELDS = {f.name: f for f in dataclasses.fields(MediaConfig)}


class BadRequest(Exception):
    """A request the server will not run; the reply names why and the connection is closed."""


# ---------------------------------------------------------------- worker processes

def _watch_parent(parent: int) -> None:
    # A server killed with SIGKILL cannot shut its pool down; its workers must not outlive it.
    while not threading.Event().wait(1.0):
        if os.getppid() != parent:
            os._exit(0)


def _worker_init(parent: int) -> None:
    torch.set_num_threads(1)  # one decode per process: scaling comes from the worker count
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops the pool
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _warm() -> int:
    import keyetron.data.dataset  # noqa: F401  (pay the imports before the first request)

    return os.getpid()


def _decode_job(kind: str, path: str, media: dict, patch_size: int) -> tuple[dict, list]:
    """Runs in a worker: (reply header, numpy arrays). Arrays travel back pickled between our own processes."""
    from keyetron.data.dataset import decode_media
    from keyetron.data.errors import MediaError
    from keyetron.data.samples import Part

    try:
        entry, pixels, grids = decode_media(Part(kind, Path(path)), MediaConfig(**media), patch_size)
    except MediaError as err:
        return {"status": "media_error", "path": err.path, "reason": err.reason}, []
    except Exception as err:  # noqa: BLE001  the client decodes locally and sees the error itself
        return {"status": "error", "error": f"{type(err).__name__}: {err}"}, []
    header = {"status": "ok", "entry": entry_to_json(entry), "grids": [list(g) for g in grids]}
    return header, [p.numpy() for p in pixels]


# ---------------------------------------------------------------- requests

def _check_value(name: str, value):
    f = _MEDIA_FIELDS.get(name)
    if f is None:
        raise BadRequest(f"unknown media field {name!r}; known: {sorted(_MEDIA_FIELDS)}")
    if value is None or isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise BadRequest(f"media field {name!r} must be a number, a string or null, got {type(value).__name__}")


def parse_decode(header: dict) -> tuple[str, str, dict, int]:
    """A decode request's (kind, path, media fields, patch size); BadRequest names what is wrong."""
    kind, path, media, patch = header.get("kind"), header.get("path"), header.get("media", {}), header.get("patch_size")
    if kind not in KINDS:
        raise BadRequest(f"'kind' must be one of {list(KINDS)}, got {kind!r}")
    if not isinstance(path, str) or not path or "\0" in path:
        raise BadRequest(f"'path' must be a non-empty string, got {path!r}")
    if not isinstance(media, dict):
        raise BadRequest(f"'media' must be an object of MediaConfig fields, got {type(media).__name__}")
    if not isinstance(patch, int) or isinstance(patch, bool) or patch <= 0:
        raise BadRequest(f"'patch_size' must be a positive integer, got {patch!r}")
    media = {k: _check_value(k, v) for k, v in media.items()}
    try:
        MediaConfig(**media)
    except (TypeError, ValueError) as err:
        raise BadRequest(f"bad media config: {err}") from None
    return kind, path, media, patch


class DecodeServer:
    """Listens on (host, port), authenticates clients and runs their decodes in ``workers`` processes."""

    def __init__(self, host: str, port: int, secret: bytes, workers: int = 2, queue_size: int = 8,
                 max_connections: int = 256, handshake_timeout: float = 10.0):
        if workers < 1 or queue_size < 0:
            raise ValueError(f"need workers >= 1 and queue_size >= 0, got {workers}, {queue_size}")
        self.host, self.port, self.secret = host, port, secret
        self.workers, self.queue_size = workers, queue_size
        self.max_connections, self.handshake_timeout = max_connections, handshake_timeout
        self.stats: Counter[str] = Counter()
        self._slots = threading.BoundedSemaphore(workers + queue_size)
        self._connections = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._stop = threading.Event()
        self._pool: ProcessPoolExecutor | None = None
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "start() first"
        return self._listener.getsockname()[:2]

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))
        for f in [pool.submit(_warm) for _ in range(self.workers)]:
            f.result(timeout=120)
        return pool

    def start(self) -> tuple[str, int]:
        """Start the workers (waiting until they are ready), then listen; returns the bound address."""
        self._pool = self._new_pool()
        self._listener = socket.create_server((self.host, self.port), backlog=128)
        self._listener.settimeout(0.2)  # accept() wakes up to notice stop()
        accept = threading.Thread(target=self._accept_loop, name="io-accept", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self.address

    def serve(self, lifetime: float | None = None) -> None:
        """Block until stop() (or SIGTERM / SIGINT via the CLI) or ``lifetime`` seconds, then shut down."""
        self._stop.wait(lifetime)
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        for t in self._threads:
            t.join(timeout=2.0)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> DecodeServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    # ------------------------------------------------------------ connections

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed by stop()
            if not self._connections.acquire(blocking=False):
                self._count("connections_refused")
                sock.close()
                continue
            threading.Thread(target=self._serve_connection, args=(sock, peer), daemon=True,
                             name=f"io-conn-{peer[0]}:{peer[1]}").start()

    def _serve_connection(self, sock: socket.socket, peer) -> None:
        ch = Channel(sock, MAX_REQUEST_BYTES, send_dir=b"s")
        replies: queue.SimpleQueue = queue.SimpleQueue()
        writer = threading.Thread(target=self._write_replies, args=(ch, replies), daemon=True)
        try:
            sock.settimeout(self.handshake_timeout)  # an unauthenticated peer cannot hold a thread for long
            try:
                server_handshake(ch, self.secret)
            except AuthenticationError:
                self._count("auth_failures")
                log.warning("refused %s: wrong secret", peer)
                return
            except (ProtocolError, OSError) as err:
                self._count("bad_handshakes")
                log.warning("dropped %s during the handshake: %s", peer, err)
                return
            sock.settimeout(None)
            writer.start()
            self._read_requests(ch, replies, peer)
        finally:
            if writer.is_alive():
                replies.put(None)
                writer.join(timeout=30.0)
            ch.close()
            self._connections.release()

    def _read_requests(self, ch: Channel, replies: queue.SimpleQueue, peer) -> None:
        while not self._stop.is_set():
            try:
                msg = ch.recv()
            except (ConnectionError, EOFError):
                return
            except OSError as err:
                log.info("connection from %s ended: %s", peer, err)
                return
            except ProtocolError as err:
                self._refuse(replies, peer, str(err))
                return
            try:
                self._handle(msg.header, msg.tensors, replies)
            except BadRequest as err:
                self._refuse(replies, peer, str(err))
                return

    def _refuse(self, replies: queue.SimpleQueue, peer, why: str) -> None:
        self._count("bad_requests")
        log.warning("bad request from %s: %s", peer, why)
        replies.put(({"status": "bad_request", "error": why}, []))

    def _handle(self, header: dict, tensors: list, replies: queue.SimpleQueue) -> None:
        rid, op = header.get("id"), header.get("op")
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise BadRequest(f"'id' must be an integer, got {rid!r}")
        if tensors:
            raise BadRequest("requests carry no tensors")
        if op == "stats":
            with self._lock:
                replies.put(({"id": rid, "status": "ok", "stats": dict(self.stats), "workers": self.workers,
                              "capacity": self.workers + self.queue_size}, []))
            return
        if op != "decode":
            raise BadRequest(f"unknown op {op!r}; known: 'decode', 'stats'")
        job = parse_decode(header)
        if not self._slots.acquire(blocking=False):
            self._count("busy")
            replies.put(({"id": rid, "status": "busy"}, []))
            return
        self._count("admitted")
        pool = self._pool
        try:
            future = pool.submit(_decode_job, *job)
        except (BrokenProcessPool, RuntimeError) as err:  # pool broken or shut down
            self._slots.release()
            self._job_failed(rid, err, replies, pool)
            return
        future.add_done_callback(lambda f: self._finish(rid, f, replies, pool))

    def _job_failed(self, rid: int, err: BaseException, replies: queue.SimpleQueue, pool) -> None:
        self._count("errors")
        replies.put(({"id": rid, "status": "error", "error": f"{type(err).__name__}: {err}"}, []))
        with self._pool_lock:
            if isinstance(err, BrokenProcessPool) and pool is self._pool and not self._stop.is_set():
                # A worker died (e.g. killed for memory): later requests get a fresh pool.
                log.error("a decode worker died; restarting the pool")
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()

    def _finish(self, rid: int, future: Future, replies: queue.SimpleQueue, pool) -> None:
        self._slots.release()
        try:
            header, arrays = future.result()
        except BaseException as err:  # noqa: BLE001  cancelled at shutdown or the worker died
            # Not in this callback thread: restarting the pool from the pool's own thread would deadlock.
            threading.Thread(target=self._job_failed, args=(rid, err, replies, pool), daemon=True).start()
            return
        self._count("media_errors" if header["status"] == "media_error" else "decoded")
        replies.put(({"id": rid, **header}, [torch.from_numpy(a) for a in arrays]))

    def _write_replies(self, ch: Channel, replies: queue.SimpleQueue) -> None:
        while (item := replies.get()) is not None:
            header, tensors = item
            try:
                ch.send(header, tensors)
            except OSError:
                return  # the client went away; its remaining replies are dropped with the connection
            if header["status"] == "bad_request":
                ch.close()
                return


def run_server(args: argparse.Namespace) -> int:
    """The ``keyetron io-server`` command."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        secret = load_secret(args.secret_file)
    except ValueError as err:
        print(f"keyetron: {err}", file=sys.stderr)
        return 2
    queue_size = 2 * args.workers if args.queue_size is None else args.queue_size
    server = DecodeServer(args.host, args.port, secret, workers=args.workers, queue_size=queue_size)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server._stop.set())
    try:
        host, port = server.start()
    except OSError as err:
        server.stop()
        print(f"keyetron: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    print(f"keyetron io-server: listening on {host}:{port} ({args.workers} workers, queue {queue_size})", flush=True)
    server.serve(args.lifetime)
    print(f"keyetron io-server: stopped ({dict(server.stats)})", flush=True)
    return 0


__all__ = ["BadRequest", "DecodeServer", "parse_decode", "run_server"]
