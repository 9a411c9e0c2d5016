"""Mutual authentication of a TCP connection with the instance's secret, before any pickle.

The server speaks first with a random challenge; the client answers with its own challenge
and an HMAC of both; the server checks it and proves itself with an HMAC the other way round.
Only then does either side read a frame. Unix sockets need none of this: they live in a
directory only the instance's owner can enter.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Optional, Tuple

_MAGIC = b"SKA1"
_NONCE = 16
_MAC = hashlib.sha256().digest_size
# Seconds a new TCP peer has to authenticate before the server drops it.
HANDSHAKE_TIMEOUT_S = 10.0

_secret: Optional[bytes] = None


class AuthenticationFailed(Exception):
    """The peer does not know the instance's secret (or does not speak this protocol)."""


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def set_secret(secret: bytes) -> None:
    """Use ``secret`` for every TCP connection this process opens or accepts."""
    global _secret
    _secret = secret


def get_secret() -> bytes:
    if _secret is None:
        raise AuthenticationFailed("This process holds no servekit instance secret, so it "
                                   "cannot open or accept authenticated TCP connections.")
    return _secret


def _mac(secret: bytes, side: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, side + first + second, hashlib.sha256).digest()


class Handshake:
    """One side of the handshake, fed the bytes that arrive until ``done``.

    ``opening()`` is what this side sends first; ``receive(data)`` returns how many bytes of
    ``data`` it used and what to send in reply, or raises ``AuthenticationFailed``.
    """

    def __init__(self, server: bool, secret: Optional[bytes] = None) -> None:
        self.server = server
        self.done = False
        self.secret = secret if secret is not None else get_secret()
        self._mine = secrets.token_bytes(_NONCE)
        self._theirs = b""

    def opening(self) -> bytes:
        return _MAGIC + self._mine if self.server else b""

    def receive(self, data: bytes) -> Tuple[int, bytes]:
        if self.server:
            return self._server_receive(data)
        return self._client_receive(data)

    def _server_receive(self, data: bytes) -> Tuple[int, bytes]:
        needed = _NONCE + _MAC
        if len(data) < needed:
            return 0, b""
        theirs, mac = data[:_NONCE], data[_NONCE:needed]
        if not hmac.compare_digest(mac, _mac(self.secret, b"client", self._mine, theirs)):
            raise AuthenticationFailed("the peer's proof of the instance secret is wrong")
        self.done = True
        return needed, _mac(self.secret, b"server", theirs, self._mine)

    def _client_receive(self, data: bytes) -> Tuple[int, bytes]:
        if not self._theirs:
            needed = len(_MAGIC) + _NONCE
            if len(data) < needed:
                return 0, b""
            if data[:len(_MAGIC)] != _MAGIC:
                raise AuthenticationFailed("the peer is not a servekit process")
            self._theirs = data[len(_MAGIC):needed]
            return needed, self._mine + _mac(self.secret, b"client", self._theirs, self._mine)
        if len(data) < _MAC:
            return 0, b""
        if not hmac.compare_digest(data[:_MAC],
                                   _mac(self.secret, b"server", self._mine, self._theirs)):
            raise AuthenticationFailed("the peer's proof of the instance secret is wrong")
        self.done = True
        return _MAC, b""
