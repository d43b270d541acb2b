"""``RemoteDecoder``: a rank's side of the decode servers, with local decoding as the last resort.

``decode(part, media, patch_size)`` returns exactly what ``keyetron.data.dataset.decode_media``
returns for the same part: one call, one result. Behind it:

- a server that is busy, times out, drops the connection or breaks the protocol is skipped and
  the next one tried (round robin, ``retries`` extra attempts in all); one that failed is left
  alone for ``down_for`` seconds;
- when no attempt succeeds the part is decoded here, and the fallback counted by reason;
- an unusable file comes back as the same ``MediaError`` local decoding raises, so the
  dataset's counted-skip handling is unchanged;
- a server that refuses our secret, or cannot prove it knows it (an impostor), raises
  ``AuthenticationError`` before any request is sent to it: that is a misconfigured job, not
  something to paper over by silently decoding everything locally;
- a reply whose authentication tag fails (altered, replayed or reflected on the way) is
  refused like a corrupt one: the connection is dropped, the failure counted as "protocol",
  and the part asked of the next server (or decoded here).

A reply is only accepted on the connection its request went out on, with its id; any failure
closes that connection, so a late reply can never be taken for another request: no sample is
returned twice or lost. Connections are per thread and per process (DataLoader workers fork).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from keyetron.data.dataset import MediaConfig, decode_media
from keyetron.data.errors import MediaError
from keyetron.data.image import PATCH
from keyetron.data.samples import Part
from keyetron.io.protocol import MAX_REPLY_BYTES, Channel, Message, ProtocolError, client_handshake, entry_from_json

log = logging.getLogger("keyetron.io")


@dataclass
class DecoderStats:
    """What happened to the parts this decoder was asked for (this process only)."""

    remote: int = 0  # decoded by a server
    local: int = 0  # decoded here after every attempt failed
    media_errors: int = 0  # unusable files reported by a server (raised as MediaError)
    busy: int = 0  # "busy" replies received (each one retried)
    # failed attempts ("connection", "timeout", "protocol": a corrupt or unauthentic reply) and
    # local fallbacks ("fallback_<reason of the last attempt>", "fallback_down": every server failed recently)
    failures: Counter = field(default_factory=Counter)


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(address, tuple):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"decode server address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


class RemoteDecoder:
    """Decodes media parts on ``addresses`` (host:port strings or tuples), falling back to local decoding."""

    def __init__(self, addresses, secret: bytes, timeout: float = 60.0, retries: int = 3,
                 connect_timeout: float = 5.0, down_for: float = 10.0, max_backoff: float = 0.25):
        self.addresses = [parse_address(a) for a in addresses]
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.secret, self.timeout, self.retries = secret, timeout, retries
        self.connect_timeout, self.down_for, self.max_backoff = connect_timeout, down_for, max_backoff
        self._setup()

    def _setup(self) -> None:
        self.stats = DecoderStats()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._down_until: dict[tuple[str, int], float] = {}
        self._turn = itertools.count()
        self._pid = os.getpid()

    # Pickled into DataLoader workers: configuration only, never sockets or locks.
    def __getstate__(self) -> dict:
        keep = ("addresses", "secret", "timeout", "retries", "connect_timeout", "down_for", "max_backoff")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    def _count(self, attr: str | None = None, reason: str | None = None) -> None:
        with self._lock:
            if attr:
                setattr(self.stats, attr, getattr(self.stats, attr) + 1)
            if reason:
                self.stats.failures[reason] += 1

    # ------------------------------------------------------------ connections

    def _channels(self) -> dict:
        if self._pid != os.getpid():  # forked: the parent's sockets are not ours to use
            self._setup()
        if not hasattr(self._local, "channels"):
            self._local.channels, self._local.next_id = {}, 0
        return self._local.channels

    def _channel(self, addr: tuple[str, int]) -> Channel:
        channels = self._channels()
        if addr not in channels:
            sock = socket.create_connection(addr, timeout=self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ch = Channel(sock, MAX_REPLY_BYTES, send_dir=b"c")
            try:
                client_handshake(ch, self.secret, f"{addr[0]}:{addr[1]}")
            except BaseException:
                ch.close()
                raise
            channels[addr] = ch
        return channels[addr]

    def _drop(self, addr: tuple[str, int]) -> None:
        ch = self._channels().pop(addr, None)
        if ch is not None:
            ch.close()

    def close(self) -> None:
        for addr in list(self._channels()):
            self._drop(addr)

    def _call(self, addr: tuple[str, int], header: dict) -> Message:
        reused = addr in self._channels()
        try:
            return self._exchange(self._channel(addr), header)
        except ConnectionError:
            if not reused:
                raise
        # A kept-alive connection can be stale (the server restarted): one fresh connection, then give up.
        self._drop(addr)
        return self._exchange(self._channel(addr), header)

    def _exchange(self, ch: Channel, header: dict) -> Message:
        self._local.next_id += 1
        rid = self._local.next_id
        ch.sock.settimeout(self.timeout)
        ch.send({**header, "id": rid})
        reply = ch.recv()
        if reply.header.get("id") != rid:
            raise ProtocolError(f"reply to request {reply.header.get('id')!r} while waiting for {rid}")
        return reply

    def _up(self, order: list) -> list[tuple[str, int]]:
        now = time.monotonic()
        return [a for a in order if self._down_until.get(a, 0.0) <= now]

    # ------------------------------------------------------------ decoding

    def server_stats(self, address) -> dict:
        """The server's counters (decoded, busy, bad_requests, auth_failures, ...)."""
        return self._call(parse_address(address), {"op": "stats"}).header["stats"]

    def decode(self, part: Part, media: MediaConfig, patch_size: int = PATCH):
        """(render entry, pixel tensors, grids) for one image or video part, as ``decode_media`` gives them."""
        header = {"op": "decode", "kind": part.kind, "path": str(part.value), "media": dataclasses.asdict(media),
                  "patch_size": patch_size}
        start = next(self._turn) % len(self.addresses) if self.addresses else 0
        order = self.addresses[start:] + self.addresses[:start]  # spread ranks' requests over the servers
        reason, busy = "no_server", 0
        for attempt in range(self.retries + 1):
            up = self._up(order)
            if not up:
                reason = "down" if self.addresses else "no_server"
                break  # every server failed recently: decode here rather than wait on them
            addr = up[attempt % len(up)]
            try:
                reply = self._call(addr, header)
            except (OSError, ProtocolError) as err:  # refused, reset, timed out, closed, corrupt or forged frame
                self._drop(addr)
                reason = ("timeout" if isinstance(err, TimeoutError) else
                          "protocol" if isinstance(err, ProtocolError) else "connection")
                self._count(reason=reason)
                self._down_until[addr] = time.monotonic() + self.down_for
                log.warning("decode server %s:%s failed (%s: %s); trying elsewhere", *addr, type(err).__name__, err)
                continue
            status = reply.header.get("status")
            if status == "ok":
                try:
                    result = self._result(reply)
                except ProtocolError as err:
                    self._drop(addr)
                    reason = "protocol"
                    self._count(reason=reason)
                    log.warning("decode server %s:%s sent a bad reply: %s", *addr, err)
                    continue
                self._count("remote")
                return result
            if status == "media_error":
                self._count("media_errors")
                raise MediaError(reply.header.get("path", header["path"]), str(reply.header.get("reason")))
            if status == "busy":
                self._count("busy")
                reason, busy = "busy", busy + 1
                if busy % len(up) == 0:  # a whole round was busy: back off before the next
                    time.sleep(min(self.max_backoff, 0.005 * 2 ** (busy // len(up))))
                continue
            # "error" (the decoder failed unexpectedly) or "bad_request": decoding here reproduces the
            # exact exception local decoding would raise, so the dataset's handling stays the same.
            if status == "bad_request":
                self._drop(addr)
            reason = "server_error"
            log.warning("decode server %s:%s answered %s: %s", *addr, status, reply.header.get("error"))
            break
        self._count("local", reason=f"fallback_{reason}")
        return decode_media(part, media, patch_size)

    @staticmethod
    def _result(reply: Message):
        grids = reply.header.get("grids")
        if not isinstance(grids, list) or len(grids) != len(reply.tensors):
            raise ProtocolError(f"{len(reply.tensors)} tensors for grids {grids!r}")
        try:
            grids = [tuple(int(x) for x in g) for g in grids]
        except (TypeError, ValueError):
            raise ProtocolError(f"bad grids {grids!r}") from None
        return entry_from_json(reply.header.get("entry")), list(reply.tensors), grids


def decoder_from_config(data) -> RemoteDecoder | None:
    """The decode-server client of a recipe's ``data`` section (``decode_servers``,
    ``decode_secret_file``, ``decode_timeout_s``); None: decode in this process."""
    if not data.decode_servers:
        return None
    from keyetron.io.protocol import load_secret

    log.info("decoding media on %s (local decoding when they are unreachable)", ", ".join(data.decode_servers))
    return RemoteDecoder(data.decode_servers, load_secret(data.decode_secret_file), timeout=data.decode_timeout_s)


__all__ = ["DecoderStats", "RemoteDecoder", "decoder_from_config", "parse_address"]
