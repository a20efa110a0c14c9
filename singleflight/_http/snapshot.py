"""Snapshot: an immutable, shareable copy of one complete response, and its byte codec."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, final

from .headers import HeaderPairs, _bytes
from .rules import is_cacheable

__all__ = (
    "SNAPSHOT_CODEC",
    "Snapshot",
    "SnapshotCodec",
)


_NONE: Final[Mapping[str, Any]] = MappingProxyType({})


@final
@dataclass(frozen=True, slots=True)
class Snapshot:
    """Snapshot is an immutable, shareable copy of one complete response.

    ``headers`` are the raw (name, value) byte pairs as received, duplicates and order kept;
    ``body`` holds the bytes as received by the adapter (httpx: still content-encoded; aiohttp
    with ``auto_decompress``: decoded, see the key's ``extra``). Every caller builds its own
    response object from it; the body bytes are shared, never copied. ``cacheable`` is decided
    once by the leader from its request and the response (``is_cacheable``). ``extensions``
    holds what the client library told about the response beyond its bytes, safe to hand to
    every caller (httpx: every response extension but the leader's ``network_stream``); it is
    in-process only: the codec does not keep it.
    """

    status: int
    reason: str
    http_version: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    cacheable: bool = field(default=False, compare=False)
    extensions: Mapping[str, Any] = field(default_factory=lambda: _NONE, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        status: int,
        reason: str,
        http_version: str,
        headers: HeaderPairs,
        body: bytes,
        *,
        request_headers: HeaderPairs = (),
    ) -> Snapshot:
        """build makes a Snapshot, judging ``cacheable`` from the response and its request."""
        pairs = tuple(
            (n, v) if type(n) is bytes and type(v) is bytes else (_bytes(n), _bytes(v))
            for n, v in headers
        )
        cacheable = is_cacheable(status, pairs, request_headers)
        return cls(status, reason, http_version, pairs, body, cacheable)

    def header(self, name: str) -> list[bytes]:
        """header returns every value of ``name`` (case-insensitive), in order."""
        wanted = name.lower().encode("latin-1")
        return [v for n, v in self.headers if n.lower() == wanted]


@final
class SnapshotCodec:
    """SnapshotCodec turns a Snapshot into bytes and back, safely: no pickle, versioned.

    Layout: ``b"SFSN"``, one version byte, a 4-byte big-endian length, that many bytes of UTF-8
    JSON metadata (status, reason, http_version, headers as latin-1 strings, cacheable), then the
    raw body bytes. Decoding validates every field and raises ``ValueError`` on anything else, so
    bytes from a shared store can never run code or build a malformed response.
    """

    MAGIC: Final = b"SFSN"
    VERSION: Final = 1
    _HEAD: Final = struct.Struct(">4sBI")

    def encode(self, value: Snapshot) -> bytes:
        """encode serialises ``value`` (a Snapshot) to bytes."""
        meta = {
            "status": value.status,
            "reason": value.reason,
            "http_version": value.http_version,
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in value.headers],
            "cacheable": value.cacheable,
        }
        blob = json.dumps(meta, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        return self._HEAD.pack(self.MAGIC, self.VERSION, len(blob)) + blob + value.body

    def decode(self, data: bytes) -> Snapshot:
        """decode rebuilds a Snapshot from ``encode`` output; ``ValueError`` if malformed."""
        view = bytes(data)
        if len(view) < self._HEAD.size:
            raise ValueError("not a singleflight snapshot: too short")
        magic, version, size = self._HEAD.unpack_from(view)
        if magic != self.MAGIC:
            raise ValueError("not a singleflight snapshot: bad magic")
        if version != self.VERSION:
            raise ValueError(f"unsupported snapshot version {version}, expected {self.VERSION}")
        start = self._HEAD.size
        if len(view) < start + size:
            raise ValueError("truncated snapshot metadata")
        try:
            meta = json.loads(view[start : start + size])
            status, reason, version_s = meta["status"], meta["reason"], meta["http_version"]
            headers = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["headers"])
            cacheable = meta["cacheable"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed snapshot metadata: {exc}") from None
        if not (isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 999):
            raise ValueError(f"malformed snapshot: status {status!r}")
        if not (isinstance(reason, str) and isinstance(version_s, str)):
            raise ValueError("malformed snapshot: reason and http_version must be strings")
        if not isinstance(cacheable, bool):
            raise ValueError("malformed snapshot: cacheable must be a boolean")
        return Snapshot(status, reason, version_s, headers, view[start + size :], cacheable)


SNAPSHOT_CODEC: Final = SnapshotCodec()
"""The codec both adapters hand to ``Group(codec=...)`` so a Redis tier stores Snapshots."""


def _snapshot_is_cacheable(value: object) -> bool:
    return isinstance(value, Snapshot) and value.cacheable
