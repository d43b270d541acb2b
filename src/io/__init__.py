"""Remote decoding: ``keyetron io-server`` decodes images and videos for training ranks.

``DecodeServer`` (``keyetron.io.server``) runs the decode work of ``DocumentBuilder`` in worker
processes that may live on other hosts; ``RemoteDecoder`` (``keyetron.io.client``) is what a
rank plugs into ``DocumentBuilder(..., decoder=...)``. It returns exactly what local decoding
returns and falls back to decoding locally when no server answers. ``protocol`` is the wire
format: HMAC-authenticated length-prefixed frames of JSON and raw tensors, never pickles.
"""
from keyetron.io.client import DecoderStats, RemoteDecoder
from keyetron.io.protocol import AuthenticationError, ProtocolError, load_secret
from keyetron.io.server import DecodeServer

__all__ = ["AuthenticationError", "DecodeServer", "DecoderStats", "ProtocolError", "RemoteDecoder", "load_secret"]
