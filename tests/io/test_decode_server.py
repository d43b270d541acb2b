"""Decode servers on loopback: same tensors as local decoding, refusals, backpressure and failover.

Forged, replayed, reflected and altered frames and impostor servers are pinned at the protocol
level in ``test_decode_security.py``; here, a reply altered on its way from a real server.

Every server is a real ``keyetron io-server`` process (its own session, so its worker
processes die with it) with a bounded ``--lifetime``; fixtures stop them in ``finally``.
"""
import itertools
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from keyetron.data.dataset import DocumentBuilder, MediaConfig, SampleDataset, decode_media
from keyetron.data.errors import MediaError
from keyetron.data.samples import Part
from keyetron.data.sources import JsonlSource
from keyetron.data.tokenizer import KeyeTokenizer
from keyetron.data.video import write_video
from keyetron.io import AuthenticationError, RemoteDecoder, load_secret
from keyetron.io.protocol import (Channel, ProtocolError, client_handshake, decode_message,
                                  encode_message)

MEDIA = MediaConfig(image_max_tokens=64, video_total_tokens=600, video_fps=2.0)
SECRET = b"0123456789abcdef0123456789abcdef"
START_TIMEOUT = 90.0


# ---------------------------------------------------------------- servers and media

def _start(secret_file: Path, workers: int, queue_size: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "keyetron.cli", "io-server", "--host", "127.0.0.1", "--port", "0",
         "--workers", str(workers), "--queue-size", str(queue_size), "--secret-file", str(secret_file),
         "--lifetime", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)


def _address(proc: subprocess.Popen) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout=START_TIMEOUT):
            raise TimeoutError(f"io-server did not start within {START_TIMEOUT} s")
        line = proc.stdout.readline()
    finally:
        sel.close()
    match = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
    assert match, f"unexpected first line from io-server: {line!r}"
    return match.group(1)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (its process group), by its own id."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # workers left behind by a SIGKILLed server: same process group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.stdout.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Three servers started together: main (2 workers), tight (1 worker, queue 1), victim (killed by a test)."""
    secret_file = tmp_path_factory.mktemp("io") / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    procs = {}
    try:
        for name, workers, queue_size in (("main", 2, 4), ("tight", 1, 1), ("victim", 1, 4)):
            procs[name] = _start(secret_file, workers, queue_size)
        yield {name: (proc, _address(proc)) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            _stop(proc)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(root / "a.png")
    frames = np.full((24, 96, 128, 3), 230, np.uint8)
    for i in range(24):  # a moving square with a jump cut half-way: slow and fast frames
        frames[i, 30:60, 4 + i * 4:34 + i * 4] = (20, 20, 200) if i < 12 else (200, 200, 20)
    write_video(root / "v.mp4", frames, 8)
    (root / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    return root


def _same(remote, local) -> None:
    (r_entry, r_pixels, r_grids), (l_entry, l_pixels, l_grids) = remote, local
    assert r_entry == l_entry
    assert r_grids == l_grids
    assert len(r_pixels) == len(l_pixels)
    for a, b in zip(r_pixels, l_pixels):
        assert a.dtype == b.dtype and torch.equal(a, b)  # bit-for-bit


class _AlteringProxy:
    """A man in the middle on loopback in front of ``upstream``: the handshake passes untouched, then one bit
    of every server -> client frame's last byte (a reply's pixel data) is flipped on the way."""

    def __init__(self, upstream: str):
        host, port = upstream.split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.altered = 0
        self._socks = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.upstream, timeout=30)
            self._socks += [client, server]
            threading.Thread(target=self._forward, args=(client, server), daemon=True).start()
            threading.Thread(target=self._alter, args=(server, client), daemon=True).start()

    @staticmethod
    def _forward(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        dst.close()

    @staticmethod
    def _exactly(sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            if not (chunk := sock.recv(n - len(buf))):
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def _alter(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            for index in itertools.count():
                head = self._exactly(src, 4)
                body = bytearray(self._exactly(src, int.from_bytes(head, "big")))
                if index >= 2:  # after the challenge and the server's proof: authenticated frames
                    body[-1] ^= 1
                    self.altered += 1
                dst.sendall(head + body)
        except OSError:
            pass
        dst.close()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        for sock in self._socks:
            sock.close()


def _raw_channel(address: str, secret: bytes = SECRET) -> Channel:
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    ch = Channel(sock, 1 << 30, send_dir=b"c")
    client_handshake(ch, secret, address)
    return ch


# ---------------------------------------------------------------- protocol (in process)

def test_messages_round_trip_tensors_without_pickle():
    tensors = [torch.randn(3, 2, 14, 14), torch.arange(5), torch.zeros(0, 4, dtype=torch.uint8),
               torch.randn(4).to(torch.bfloat16)]
    msg = decode_message(bytearray(b"".join(bytes(p) for p in encode_message({"id": 1}, tensors))))
    assert msg.header == {"id": 1}
    for a, b in zip(msg.tensors, tensors):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_inconsistent_tensor_headers_are_protocol_errors():
    pieces = encode_message({"id": 1}, [torch.ones(4)])
    with pytest.raises(ProtocolError, match="needs 16 bytes"):
        decode_message(bytearray(b"".join(bytes(p) for p in pieces[:2])))  # tensor bytes missing
    head = json.dumps({"tensors": [{"dtype": "object", "shape": [1]}]}).encode()
    with pytest.raises(ProtocolError, match="bad tensor header"):
        decode_message(bytearray(len(head).to_bytes(4, "big") + head))


def test_secret_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    (tmp_path / "s").write_text("  " + SECRET.decode() + "\n")
    assert load_secret(tmp_path / "s") == SECRET
    monkeypatch.setenv("KEYETRON_IO_SECRET", SECRET.decode())
    assert load_secret() == SECRET
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ValueError, match="at least 16"):
        load_secret(tmp_path / "short")


# ---------------------------------------------------------------- servers

def test_remote_decoding_equals_local_decoding_bit_for_bit(servers, media):
    decoder = RemoteDecoder([servers["main"][1]], SECRET, timeout=30)
    for part in (Part("image", media / "a.png"), Part("video", media / "v.mp4")):
        _same(decoder.decode(part, MEDIA), decode_media(part, MEDIA))
    assert decoder.stats.remote == 2 and decoder.stats.local == 0


def test_builder_with_remote_decoder_builds_the_same_documents(servers, media, tmp_path, tiny_cfg):
    tok = KeyeTokenizer()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"s{i}", "messages": [
        {"role": "user", "content": [{kind: str(media / name)}, "What is it?"]},
        {"role": "assistant", "content": "a thing"}]}) + "\n"
        for i, (kind, name) in enumerate([("image", "a.png"), ("video", "v.mp4"), ("video", "bad.mp4")])))
    decoder = RemoteDecoder([servers["main"][1]], SECRET, timeout=30)
    remote = SampleDataset(JsonlSource(manifest), DocumentBuilder(tiny_cfg, tok, MEDIA, decoder=decoder))
    local = SampleDataset(JsonlSource(manifest), DocumentBuilder(tiny_cfg, tok, MEDIA))
    for i in range(2):
        r, l = remote.document(i), local.document(i)
        for name in ("input_ids", "targets", "position_ids", "pixel_values", "vision_grid_thw"):
            assert torch.equal(getattr(r, name), getattr(l, name)), name
    # A bad video is the same counted skip, with the same reason, whether decoded remotely or here.
    assert remote.document(2) is None and local.document(2) is None
    assert remote.skips.counts == local.skips.counts == {"bad_media": 1}
    assert remote.skips.entries == local.skips.entries
    assert decoder.stats.media_errors == 1 and decoder.stats.local == 0


def test_bad_video_is_a_media_error_on_the_client(servers, media):
    decoder = RemoteDecoder([servers["main"][1]], SECRET, timeout=30)
    part = Part("video", media / "bad.mp4")
    with pytest.raises(MediaError) as remote:
        decoder.decode(part, MEDIA)
    with pytest.raises(MediaError) as local:
        decode_media(part, MEDIA)
    assert str(remote.value) == str(local.value) and remote.value.path == str(media / "bad.mp4")


def test_wrong_secret_is_refused(servers, media):
    decoder = RemoteDecoder([servers["main"][1]], b"not-the-secret-not-the-secret!!!", timeout=30)
    with pytest.raises(AuthenticationError, match="refused"):
        decoder.decode(Part("image", media / "a.png"), MEDIA)
    stats = RemoteDecoder([servers["main"][1]], SECRET, timeout=30).server_stats(servers["main"][1])
    assert stats["auth_failures"] >= 1


def test_malformed_requests_are_refused_and_the_server_keeps_serving(servers, media):
    address = servers["main"][1]
    host, port = address.split(":")
    # Garbage instead of a handshake: the server closes the connection.
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall((2**31).to_bytes(4, "big"))  # a 2 GiB "handshake"
        assert sock.recv(1 << 16).startswith(b"\x00")  # its challenge, sent before it read ours
        assert sock.recv(1 << 16) == b""  # then it hangs up
    # Authenticated but malformed: a "bad_request" reply naming the problem, then the connection closes.
    for header, why in (({"op": "decode", "id": 1, "kind": "audio", "path": "x", "patch_size": 14}, "'kind'"),
                        ({"op": "decode", "id": 2, "kind": "image", "path": "x", "patch_size": 14,
                          "media": {"image_max_tokens": "many"}}, "bad media config"),
                        ({"op": "shutdown", "id": 3}, "unknown op")):
        ch = _raw_channel(address)
        try:
            ch.send(header)
            reply = ch.recv()
            assert reply.header["status"] == "bad_request" and why in reply.header["error"]
            with pytest.raises(ConnectionError):
                ch.recv()
        finally:
            ch.close()
    # A forged frame (tagged with the wrong key) is refused the same way.
    ch = _raw_channel(address)
    try:
        session_key = ch.key
        ch.key = b"x" * 32
        ch.send({"op": "stats", "id": 1})
        ch.key = session_key
        reply = ch.recv()
        assert reply.header["status"] == "bad_request" and "authentication tag" in reply.header["error"]
    finally:
        ch.close()
    decoder = RemoteDecoder([address], SECRET, timeout=30)
    _same(decoder.decode(Part("image", media / "a.png"), MEDIA), decode_media(Part("image", media / "a.png"), MEDIA))
    stats = decoder.server_stats(address)
    assert stats["bad_requests"] >= 4 and stats["bad_handshakes"] >= 1


def test_a_full_queue_answers_busy_and_clients_retry(servers, media):
    address = servers["tight"][1]  # 1 worker, queue 1: at most 2 decodes admitted
    ch = _raw_channel(address)
    try:
        request = {"op": "decode", "kind": "video", "path": str(media / "v.mp4"), "patch_size": 14,
                   "media": {"video_total_tokens": 600, "video_fps": 2.0}}
        for rid in range(1, 6):  # pipelined: read by the server faster than one video decodes
            ch.send({**request, "id": rid})
        replies = [ch.recv().header for _ in range(5)]
    finally:
        ch.close()
    assert sorted(r["id"] for r in replies) == [1, 2, 3, 4, 5]  # one reply per request
    statuses = [r["status"] for r in replies]
    assert statuses.count("ok") >= 2 and statuses.count("busy") >= 1, statuses  # typically 3 busy, 2 ok
    # Through the client, every request ends in exactly one correct result from the server.
    decoder = RemoteDecoder([address], SECRET, timeout=30, retries=200, max_backoff=0.05)
    part = Part("video", media / "v.mp4")
    results, barrier = [None] * 6, threading.Barrier(6)

    def run(i):
        barrier.wait(timeout=30)
        results[i] = decoder.decode(part, MEDIA)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    local = decode_media(part, MEDIA)
    for r in results:
        _same(r, local)
    assert decoder.stats.remote == 6 and decoder.stats.local == 0
    assert decoder.stats.busy >= 1  # 6 concurrent requests, 2 admitted at a time: some were told to retry


def test_killing_a_server_mid_epoch_loses_and_duplicates_nothing(servers, media, tmp_path, tiny_cfg):
    tok = KeyeTokenizer()
    names = [("image", "a.png"), ("video", "v.mp4")] * 4
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"s{i}", "messages": [
        {"role": "user", "content": [{kind: str(media / name)}, "What is it?"]},
        {"role": "assistant", "content": "a thing"}]}) + "\n" for i, (kind, name) in enumerate(names)))
    victim_proc, victim = servers["victim"]
    failover = RemoteDecoder([victim, servers["main"][1]], SECRET, timeout=30, retries=2)
    alone = RemoteDecoder([victim], SECRET, timeout=30, retries=2)
    reference = SampleDataset(JsonlSource(manifest), DocumentBuilder(tiny_cfg, tok, MEDIA))
    datasets = [SampleDataset(JsonlSource(manifest), DocumentBuilder(tiny_cfg, tok, MEDIA, decoder=d))
                for d in (failover, alone)]
    seen = {0: [], 1: []}
    for i in range(len(names)):
        if i == 3:
            os.killpg(victim_proc.pid, signal.SIGKILL)  # the server and its workers, mid-epoch
            victim_proc.wait(timeout=10)
        want = reference.document(i)
        for k, ds in enumerate(datasets):
            doc = ds.document(i)
            assert doc is not None, ds.skips.summary()
            assert doc.sample_id == want.sample_id
            assert torch.equal(doc.input_ids, want.input_ids) and torch.equal(doc.pixel_values, want.pixel_values)
            seen[k].append(doc.sample_id)
    expected = [f"s{i}" for i in range(len(names))]
    assert seen[0] == expected and seen[1] == expected  # every sample once, in order
    assert all(ds.skips.total == 0 for ds in datasets)
    # With a second server nothing is decoded locally; alone, everything after the kill is.
    assert failover.stats.local == 0 and failover.stats.remote == len(names)
    assert alone.stats.remote == 3 and alone.stats.local == len(names) - 3
    assert alone.stats.failures["connection"] >= 1


def test_an_altered_reply_is_refused_and_the_part_decoded_once_elsewhere(servers, media):
    """Pins the client's check of reply tags: a reply altered in transit is never returned; the client
    counts it, drops the connection and asks the next server, or decodes here when there is none."""
    main = servers["main"][1]
    part = Part("image", media / "a.png")
    local = decode_media(part, MEDIA)
    proxy = _AlteringProxy(main)
    try:
        failover = RemoteDecoder([proxy.address, main], SECRET, timeout=30, retries=2)  # the proxy is asked first
        _same(failover.decode(part, MEDIA), local)
        assert proxy.altered == 1
        assert failover.stats.remote == 1 and failover.stats.local == 0  # one result, from the server itself
        assert failover.stats.failures == {"protocol": 1}
        alone = RemoteDecoder([proxy.address], SECRET, timeout=30, retries=2)
        _same(alone.decode(part, MEDIA), local)
        assert proxy.altered == 2
        assert alone.stats.remote == 0 and alone.stats.local == 1
        assert alone.stats.failures == {"protocol": 1, "fallback_down": 1}
    finally:
        proxy.close()


# ---------------------------------------------------------------- the trainer's data.decode_servers

def test_training_with_a_decode_server_decodes_there_and_learns_the_same(tmp_path):
    from keyetron.data.demo import make_demo
    from keyetron.train.recipe import load_recipe
    from keyetron.train.trainer import Trainer

    make_demo(tmp_path / "demo", seed=4, train_size=16, eval_size=2)
    secret = tmp_path / "secret"
    secret.write_text("trainer-offload-secret")

    def run(name, servers):
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({
            "name": name, "output_dir": str(tmp_path / name), "model": {"config": "tiny"},
            "data": {"sources": [str(tmp_path / "demo" / "train.jsonl")], "decode_servers": servers,
                     "decode_secret_file": str(secret),
                     "media": {"image_max_tokens": 16, "video_total_tokens": 96, "video_fps": 1.0},
                     "loader": {"row_tokens": 256, "buffer_docs": 4}},
            "optim": {"lr": 1e-3}, "train": {"steps": 2}, "checkpoint": {"resume": "none"},
            "log": {"every": 1, "tensorboard": False}}))
        trainer = Trainer(load_recipe(str(path)))
        summary = trainer.fit()
        return summary, trainer.dataset.builder.decoder

    proc = _start(secret, workers=1, queue_size=4)
    try:
        remote_summary, decoder = run("remote", [_address(proc)])
    finally:
        _stop(proc)
    local_summary, _ = run("local", [])
    assert decoder.stats.remote > 0 and decoder.stats.local == 0
    assert remote_summary["final_loss"] == local_summary["final_loss"]  # the same pixels, bit for bit
