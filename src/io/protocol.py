"""The decode server's wire format: authenticated, length-prefixed frames of JSON plus raw tensors.

A frame is ``length (4 bytes, big-endian) | body``. Before authentication the body is a
JSON object. The handshake is an HMAC-SHA256 challenge-response with a shared secret, in
both directions (the client proves it knows the secret, then the server does):

    server -> client   {"proto", "nonce": server_nonce}
    client -> server   {"proto", "nonce": client_nonce, "mac": HMAC(secret, "client" | sn | cn)}
    server -> client   {"status": "ok", "mac": HMAC(secret, "server" | sn | cn)}  or "refused", then close

The client sends nothing but its proof until the server's proof checks out; a server that cannot
prove the secret (wrong, missing or reflected "mac") is an ``AuthenticationError``, like a refusal.

Every later frame's body is ``tag (32 bytes) | message``, with

    tag = HMAC(session_key, direction | sequence number (8 bytes, big-endian) | message)
    session_key = HMAC(secret, "session" | sn | cn)

where the direction is "c" for client -> server frames and "s" for server -> client frames, and
each side counts the frames it sends and receives from 0 on every connection. A frame that was
forged (key), altered (message), replayed or reordered (sequence number), reflected back to its
sender (direction) or replayed from another connection (nonces in the key) fails the check.
The secret itself never crosses the wire. Frames are authenticated, not encrypted: run the
servers on a trusted network (or through an SSH / TLS tunnel) if the media is private.

A message is ``header length (4 bytes) | header JSON | tensor bytes``; the header's
``tensors`` list gives each tensor's dtype (from a fixed whitelist) and shape, and the bytes
must add up exactly. Nothing received is ever unpickled.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keyetron.data.render import VideoLayout

PROTOCOL = "keyetron-decode/1"
SECRET_ENV = "KEYETRON_IO_SECRET"
MIN_SECRET_BYTES = 16
MAX_REQUEST_BYTES = 1 << 20  # a request is a small JSON object; anything larger is refused
MAX_REPLY_BYTES = (1 << 32) - 1  # the 4-byte length's limit (~700 MB is a 75k-token video in float32)
TAG_BYTES = 32
_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16, "int64": torch.int64, "uint8": torch.uint8}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ProtocolError(Exception):
    """A frame or message that breaks the protocol (bad length, bad tag, bad JSON, bad tensor header)."""


class AuthenticationError(Exception):
    """The other side does not know the shared secret. A configuration error, never a skipped sample."""


def load_secret(path: str | Path | None = None) -> bytes:
    """The shared secret from ``path`` (surrounding whitespace stripped) or from $KEYETRON_IO_SECRET."""
    if path is not None:
        path = Path(path)
        try:
            secret = path.read_bytes().strip()
        except OSError as err:
            raise ValueError(f"cannot read the decode-server secret file {path}: {err}") from err
        where = str(path)
    else:
        secret = os.environ.get(SECRET_ENV, "").strip().encode()
        where = f"${SECRET_ENV}"
        if not secret:
            raise ValueError(f"no decode-server secret: pass --secret-file or set {SECRET_ENV}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the decode-server secret in {where} is {len(secret)} bytes; use at least "
                         f"{MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -hex 32 > secret`)")
    return secret


def _mac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()


@dataclass
class Message:
    header: dict
    tensors: list[torch.Tensor] = field(default_factory=list)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def encode_message(header: dict, tensors=()) -> list:
    """Header + tensors -> the byte pieces of one message (tensor bytes are not copied)."""
    metas = []
    for t in tensors:
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"cannot send a {t.dtype} tensor; supported: {sorted(DTYPES)}")
        metas.append({"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)})
    head = json.dumps({**header, "tensors": metas}, separators=(",", ":")).encode()
    return [_LEN.pack(len(head)), head, *(_tensor_bytes(t) for t in tensors)]


def decode_message(body: bytearray | memoryview) -> Message:
    """Bytes of one message -> Message (tensors share its memory); anything inconsistent is a ProtocolError."""
    if len(body) < _LEN.size:
        raise ProtocolError("message shorter than its header length")
    (n,) = _LEN.unpack_from(body)
    if n > len(body) - _LEN.size:
        raise ProtocolError(f"header length {n} exceeds the message ({len(body)} bytes)")
    try:
        header = json.loads(bytes(body[_LEN.size:_LEN.size + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(header).__name__}")
    metas = header.pop("tensors", [])
    if not isinstance(metas, list):
        raise ProtocolError("'tensors' must be a list")
    offset, tensors = _LEN.size + n, []
    for meta in metas:
        if (not isinstance(meta, dict) or meta.get("dtype") not in DTYPES or not isinstance(meta.get("shape"), list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in meta["shape"])):
            raise ProtocolError(f"bad tensor header {meta!r}")
        dtype = DTYPES[meta["dtype"]]
        count = math.prod(meta["shape"])
        nbytes = count * dtype.itemsize
        if nbytes > len(body) - offset:
            raise ProtocolError(f"tensor {meta!r} needs {nbytes} bytes, {len(body) - offset} left")
        t = torch.frombuffer(body, dtype=dtype, count=count, offset=offset) if count else torch.empty(0, dtype=dtype)
        tensors.append(t.view(meta["shape"]))
        offset += nbytes
    if offset != len(body):
        raise ProtocolError(f"{len(body) - offset} bytes left over after the tensors")
    return Message(header, tensors)


KINDS = ("image", "video")


def entry_to_json(entry: int | VideoLayout) -> dict:
    """A decode result's render entry (image token count or VideoLayout) as JSON; floats round-trip exactly."""
    if isinstance(entry, VideoLayout):
        return {"video": {"timestamps": list(entry.timestamps), "frame_types": list(entry.frame_types),
                          "slow_tokens": entry.slow_tokens, "fast_tokens": entry.fast_tokens}}
    return {"image_tokens": int(entry)}


def entry_from_json(obj) -> int | VideoLayout:
    try:
        if "image_tokens" in obj:
            return int(obj["image_tokens"])
        v = obj["video"]
        return VideoLayout(tuple(float(t) for t in v["timestamps"]), tuple(int(t) for t in v["frame_types"]),
                           int(v["slow_tokens"]), int(v["fast_tokens"]))
    except (TypeError, KeyError, ValueError) as err:
        raise ProtocolError(f"bad render entry {obj!r}: {err}") from None


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"connection closed by peer ({got} of {n} bytes received)")
        got += k
    return buf


class Channel:
    """One connection's framing: plain JSON until ``authenticate``, then tagged messages with sequence numbers."""

    def __init__(self, sock: socket.socket, max_recv: int, send_dir: bytes):
        assert send_dir in (b"c", b"s")
        self.sock = sock
        self.max_recv = max_recv
        self.send_dir, self.recv_dir = send_dir, b"s" if send_dir == b"c" else b"c"
        self.key: bytes | None = None
        self.sent = self.received = 0

    def authenticate(self, key: bytes) -> None:
        self.key = key

    def _recv_frame(self) -> bytearray:
        (n,) = _LEN.unpack(_recv_exact(self.sock, _LEN.size))
        if n > self.max_recv:
            raise ProtocolError(f"frame of {n} bytes exceeds the limit of {self.max_recv}")
        return _recv_exact(self.sock, n)

    def send_json(self, obj: dict) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.sock.sendall(_LEN.pack(len(body)) + body)

    def recv_json(self) -> dict:
        body = self._recv_frame()
        try:
            obj = json.loads(bytes(body))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ProtocolError(f"handshake frame is not JSON: {err}") from None
        if not isinstance(obj, dict):
            raise ProtocolError("handshake frame must be a JSON object")
        return obj

    def send(self, header: dict, tensors=()) -> None:
        assert self.key is not None, "send() before authentication"
        pieces = encode_message(header, tensors)
        tag = _mac(self.key, self.send_dir, _SEQ.pack(self.sent), *pieces)
        self.sent += 1
        size = TAG_BYTES + sum(len(p) for p in pieces)
        self.sock.sendall(_LEN.pack(size) + tag + bytes(pieces[0]) + bytes(pieces[1]))
        for p in pieces[2:]:
            self.sock.sendall(p)

    def recv(self) -> Message:
        assert self.key is not None, "recv() before authentication"
        body = self._recv_frame()
        if len(body) < TAG_BYTES:
            raise ProtocolError("frame shorter than its authentication tag")
        msg = memoryview(body)[TAG_BYTES:]
        expected = _mac(self.key, self.recv_dir, _SEQ.pack(self.received), msg)
        if not hmac.compare_digest(bytes(body[:TAG_BYTES]), expected):
            sender = "client" if self.recv_dir == b"c" else "server"
            raise ProtocolError(f"bad message authentication tag on frame {self.received} from the {sender}: it was "
                                "forged, altered, replayed, reordered or reflected on the way; the connection is "
                                "dropped (if this repeats, check what sits on the network path between the two)")
        self.received += 1
        return decode_message(msg)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _nonce(obj: dict, key: str) -> bytes:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) != 64:
        raise ProtocolError(f"handshake field {key!r} must be 32 bytes in hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f"handshake field {key!r} is not hex") from None


def server_handshake(ch: Channel, secret: bytes) -> None:
    """Challenge the client; on success the channel is authenticated, else AuthenticationError after a refusal."""
    sn = os.urandom(32)
    ch.send_json({"proto": PROTOCOL, "nonce": sn.hex()})
    hello = ch.recv_json()
    if hello.get("proto") != PROTOCOL:
        ch.send_json({"status": "refused", "error": f"unsupported protocol {hello.get('proto')!r}; want {PROTOCOL}"})
        raise ProtocolError(f"client speaks {hello.get('proto')!r}")
    cn = _nonce(hello, "nonce")
    if not hmac.compare_digest(_nonce(hello, "mac"), _mac(secret, b"client", sn, cn)):
        ch.send_json({"status": "refused", "error": "authentication failed: the client's secret does not match"})
        raise AuthenticationError("client failed the challenge")
    ch.send_json({"status": "ok", "mac": _mac(secret, b"server", sn, cn).hex()})
    ch.authenticate(_mac(secret, b"session", sn, cn))


def client_handshake(ch: Channel, secret: bytes, where: str) -> None:
    """Answer the server's challenge and check its proof; AuthenticationError names the server."""
    hello = ch.recv_json()
    if hello.get("proto") != PROTOCOL:
        raise ProtocolError(f"{where} speaks {hello.get('proto')!r}, not {PROTOCOL}")
    sn, cn = _nonce(hello, "nonce"), os.urandom(32)
    ch.send_json({"proto": PROTOCOL, "nonce": cn.hex(), "mac": _mac(secret, b"client", sn, cn).hex()})
    reply = ch.recv_json()
    if reply.get("status") != "ok":
        raise AuthenticationError(f"decode server {where} refused this client: {reply.get('error')}; "
                                  f"use the same secret file / ${SECRET_ENV} on both sides")
    try:
        proof = _nonce(reply, "mac")
    except ProtocolError:
        proof = b""  # no proof at all: the same failure as a wrong one
    if not hmac.compare_digest(proof, _mac(secret, b"server", sn, cn)):
        raise AuthenticationError(f"decode server {where} failed to prove it knows the shared secret, so nothing "
                                  f"was sent to it: check that its --secret-file and this job's "
                                  f"data.decode_secret_file / ${SECRET_ENV} hold the same secret, and that "
                                  f"{where} is a keyetron io-server")
    ch.authenticate(_mac(secret, b"session", sn, cn))


__all__ = ["AuthenticationError", "Channel", "DTYPES", "KINDS", "MAX_REPLY_BYTES", "MAX_REQUEST_BYTES", "Message",
           "PROTOCOL", "ProtocolError", "SECRET_ENV", "client_handshake", "decode_message", "encode_message",
           "entry_from_json", "entry_to_json", "load_secret", "server_handshake"]
