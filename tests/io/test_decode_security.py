"""The decode protocol's security claims, each pinned by the check that makes it true.

The test plays the network between a client and a server channel (socket pairs, in process):
it takes frames off the wire before their receiver reads them, then delivers them twice, out of
order, back to their sender, on another connection or altered. Each test names the part of the
tag or handshake it pins (the format is in ``keyetron.io.protocol``'s docstring); removing that
part makes it fail. The altered reply through a real server is in ``test_decode_server.py``.
"""
import json
import os
import re
import socket
import threading

import pytest
import torch
from PIL import Image

from keyetron.data.dataset import MediaConfig
from keyetron.data.samples import Part
from keyetron.io import AuthenticationError, RemoteDecoder
from keyetron.io.protocol import PROTOCOL, Channel, ProtocolError, client_handshake, server_handshake

SECRET = b"0123456789abcdef0123456789abcdef"
WIRE_TIMEOUT = 10.0  # a missing check fails a test instead of hanging it


class _Tap:
    """A socket that also keeps what it sent: what an eavesdropper on the wire records."""

    def __init__(self, sock: socket.socket):
        self._sock, self.sent = sock, bytearray()

    def sendall(self, data) -> None:
        self.sent += data
        self._sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _exactly(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _take(sock) -> bytes:
    """The next frame (length prefix included) arriving at ``sock``, taken off the wire."""
    head = _exactly(sock, 4)
    return head + _exactly(sock, int.from_bytes(head, "big"))


def _serve_handshake(ch: Channel):
    """Run server_handshake(ch) in a thread; the returned function joins it and gives its exception or None."""
    errors = []

    def run():
        try:
            server_handshake(ch, SECRET)
        except Exception as err:  # noqa: BLE001  the test inspects it
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def outcome():
        thread.join(WIRE_TIMEOUT)
        assert not thread.is_alive(), "server_handshake did not finish"
        return errors[0] if errors else None

    return outcome


def _socketpair():
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(WIRE_TIMEOUT)
    return a, b


def _connect() -> tuple[Channel, Channel]:
    """(client, server) channels, authenticated; the client's socket records what it sent."""
    a, b = _socketpair()
    client, server = Channel(_Tap(a), 1 << 20, send_dir=b"c"), Channel(b, 1 << 20, send_dir=b"s")
    outcome = _serve_handshake(server)
    client_handshake(client, SECRET, "test-server")
    assert outcome() is None
    return client, server


@pytest.fixture
def connect():
    channels = []

    def make():
        pair = _connect()
        channels.extend(pair)
        return pair

    yield make
    for ch in channels:
        ch.close()


# ---------------------------------------------------------------- sequence number: replayed, reordered

@pytest.mark.parametrize("towards", ["server", "client"])
def test_a_replayed_frame_is_refused(connect, towards):
    """Pins the sequence number in the tag: the same frame, tag and all, delivered twice."""
    client, server = connect()
    sender, receiver = (client, server) if towards == "server" else (server, client)
    sender.send({"id": 1, "op": "stats"})
    frame = _take(receiver.sock)
    sender.sock.sendall(frame)  # delivered once: genuine
    assert receiver.recv().header == {"id": 1, "op": "stats"}
    sender.sock.sendall(frame)  # delivered again
    with pytest.raises(ProtocolError, match="authentication tag on frame 1"):
        receiver.recv()


def test_frames_delivered_out_of_order_are_refused(connect):
    """Pins the sequence number in the tag: two genuine frames, the second delivered first."""
    client, server = connect()
    client.send({"id": 1, "op": "stats"})
    client.send({"id": 2, "op": "stats"})
    first, second = _take(server.sock), _take(server.sock)
    client.sock.sendall(second + first)
    with pytest.raises(ProtocolError, match="authentication tag on frame 0"):
        server.recv()


def test_a_frame_replayed_on_another_connection_is_refused(connect):
    """Pins both nonces in the session key: same direction, same sequence number, another connection."""
    client1, server1 = connect()
    client2, server2 = connect()
    client1.send({"id": 1, "op": "stats"})
    client2.sock.sendall(_take(server1.sock))
    with pytest.raises(ProtocolError, match="authentication tag on frame 0"):
        server2.recv()


def test_a_recorded_handshake_does_not_log_in_again(connect):
    """Pins the server's fresh nonce: a client's recorded handshake replayed by someone without the secret."""
    client, _ = connect()
    recorded = bytes(client.sock.sent)  # the client's side of a successful handshake, as seen on the wire
    a, b = _socketpair()
    try:
        outcome = _serve_handshake(Channel(b, 1 << 20, send_dir=b"s"))
        a.sendall(recorded)
        _take(a)  # this connection's challenge
        reply = json.loads(_take(a)[4:])
        assert reply["status"] == "refused", reply
        assert isinstance(outcome(), AuthenticationError)
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- direction: reflected

@pytest.mark.parametrize("origin", ["server", "client"])
def test_a_reflected_frame_is_refused(connect, origin):
    """Pins the direction in the tag: a frame sent back to its sender (same key, same sequence number)."""
    client, server = connect()
    sender, other = (server, client) if origin == "server" else (client, server)
    sender.send({"id": 1, "status": "ok"})
    frame = _take(other.sock)  # off the wire before the other side reads it ...
    other.sock.sendall(frame)  # ... and back to where it came from
    with pytest.raises(ProtocolError, match="authentication tag on frame 0"):
        sender.recv()


# ---------------------------------------------------------------- message: altered

@pytest.mark.parametrize("where", ["tag", "header", "tensor"])
def test_an_altered_frame_is_refused(connect, where):
    """Pins the message (header and tensor bytes) in the tag: one bit flipped in transit."""
    client, server = connect()
    server.send({"id": 1, "status": "ok"}, [torch.arange(8, dtype=torch.float32)])
    frame = bytearray(_take(client.sock))
    # "header": the reply's id 1 becomes 0, still valid JSON: a reply taken for another request
    index = {"tag": 4, "header": frame.index(b'"id":1') + 5, "tensor": len(frame) - 1}[where]
    frame[index] ^= 1
    server.sock.sendall(frame)
    with pytest.raises(ProtocolError, match="authentication tag on frame 0"):
        client.recv()


# ---------------------------------------------------------------- the server's proof: impostors

class _Impostor:
    """Plays a decode server on loopback without the secret: challenges the client, answers with
    ``proof(client's answer)``, then keeps whatever else the client sends (nothing, if it checked)."""

    def __init__(self, proof):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WIRE_TIMEOUT)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.after_handshake: bytes | None = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(proof,), daemon=True)
        self._thread.start()

    def _run(self, proof) -> None:
        try:
            sock, _ = self.listener.accept()
            with sock:
                sock.settimeout(WIRE_TIMEOUT)
                ch = Channel(sock, 1 << 20, send_dir=b"s")
                ch.send_json({"proto": PROTOCOL, "nonce": os.urandom(32).hex()})
                ch.send_json(proof(ch.recv_json()))
                self.after_handshake = sock.recv(1 << 16)  # b"": the client hung up; closing fails a client that sent
        except Exception as err:  # noqa: BLE001  the test inspects it
            self.error = err
        finally:
            self.listener.close()

    def received_after_handshake(self) -> bytes:
        self._thread.join(WIRE_TIMEOUT + 1)
        assert not self._thread.is_alive() and self.error is None, self.error
        return self.after_handshake


@pytest.mark.parametrize("proof", [lambda hello: {"status": "ok"},
                                   lambda hello: {"status": "ok", "mac": os.urandom(32).hex()},
                                   lambda hello: {"status": "ok", "mac": hello["mac"]}],
                         ids=["no-proof", "made-up-proof", "client-proof-reflected"])
def test_an_impostor_server_gets_no_request_and_the_client_stops(proof, tmp_path):
    """Pins the client's check of the server's proof, including its "server" label (a reflected client
    proof fails). A server that cannot prove the secret is a misconfigured job: AuthenticationError, no
    request sent, no silent local decoding."""
    image = tmp_path / "a.png"
    Image.new("RGB", (28, 28)).save(image)
    impostor = _Impostor(proof)
    decoder = RemoteDecoder([impostor.address], SECRET, timeout=WIRE_TIMEOUT, connect_timeout=WIRE_TIMEOUT)
    with pytest.raises(AuthenticationError, match=rf"{re.escape(impostor.address)} failed to prove it knows the "
                                                  r"shared secret.*KEYETRON_IO_SECRET"):
        decoder.decode(Part("image", image), MediaConfig(image_max_tokens=16))
    assert impostor.received_after_handshake() == b""  # not one byte of a request (no path, no media config)
    assert decoder.stats.remote == decoder.stats.local == 0
