"""What the Redis tier writes: key names, the versioned record format and the default codec.

Nothing here is ever unpickled. A record is::

    b"sf" + version (1 byte) + len(meta) (4 bytes, big-endian) + meta (JSON object) + payload

``meta["status"]`` says what the record carries: ``"ok"`` (payload = the codec's bytes of the
value), or a bare outcome with an empty payload: ``"err"`` (the leader's work raised),
``"unshared"`` (the leader's value must not be shared: run your own work) or ``"abandon"``
(the leader gave up: take over now). Anyone who can write to the Redis can make a worker read a
wrong value, but never make it run code: JSON and the codec's own format are all we parse.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Final, final

__all__ = (
    "DEFAULT_CODEC",
    "BadRecord",
    "DefaultCodec",
    "Keys",
    "Record",
    "decode_record",
    "encode_record",
    "key_digest",
)

_MAGIC: Final = b"sf"
VERSION: Final = 1
_HEADER: Final = struct.Struct(">2sBI")  # magic, version, meta length
_OK_META: Final = b'{"status":"ok"}'  # what encode_record("ok", payload) writes


class BadRecord(ValueError):
    """A value in Redis that is not a record this version can read (treated as a miss)."""


@final
@dataclass(frozen=True, slots=True)
class Record:
    """A decoded record: its status (``ok``/``err``/``unshared``/``abandon``) and payload."""

    status: str
    payload: bytes


def encode_record(status: str, payload: bytes = b"", **meta: Any) -> bytes:
    """encode_record builds the bytes stored in Redis for one outcome."""
    body = json.dumps({"status": status, **meta}, separators=(",", ":")).encode()
    return _HEADER.pack(_MAGIC, VERSION, len(body)) + body + payload


def decode_record(data: bytes) -> Record:
    """decode_record parses a record; raises BadRecord for anything else."""
    if len(data) < _HEADER.size:
        raise BadRecord("too short")
    magic, version, size = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != VERSION:
        raise BadRecord(f"unknown format {magic!r} v{version}")
    end = _HEADER.size + size
    if data[_HEADER.size : end] == _OK_META:  # the common case, without a JSON parse
        return Record("ok", bytes(data[end:]))
    try:
        meta = json.loads(data[_HEADER.size : end])
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise BadRecord(f"bad metadata: {exc}") from None
    if len(data) < end or not isinstance(meta, dict) or not isinstance(meta.get("status"), str):
        raise BadRecord("bad metadata")
    return Record(meta["status"], bytes(data[end:]))


# -- keys ------------------------------------------------------------------------------------


def _canon(obj: object, out: bytearray) -> None:
    # A tagged, length-prefixed encoding: equal keys give equal bytes in every process (unlike
    # hash() or repr(), which vary with PYTHONHASHSEED and object addresses), and no two
    # different keys give the same bytes.
    if obj is None:
        out += b"N"
    elif obj is True or obj is False:
        out += b"T" if obj else b"F"
    elif isinstance(obj, int):
        out += b"i%d;" % obj
    elif isinstance(obj, float):
        out += b"f" + obj.hex().encode() + b";"
    elif isinstance(obj, str):
        raw = obj.encode("utf-8", "surrogatepass")
        out += b"s%d:" % len(raw) + raw
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        out += b"b%d:" % len(raw) + raw
    elif isinstance(obj, tuple):
        out += b"(%d:" % len(obj)
        for item in obj:
            _canon(item, out)
        out += b")"
    elif isinstance(obj, frozenset):
        parts = []
        for item in obj:
            part = bytearray()
            _canon(item, part)
            parts.append(bytes(part))
        out += b"{%d:" % len(parts) + b"".join(sorted(parts)) + b"}"
    elif isinstance(obj, type):  # e.g. the kwargs marker in cachetools.keys.hashkey
        raw = f"{obj.__module__}.{obj.__qualname__}".encode()
        out += b"t%d:" % len(raw) + raw
    else:
        raise TypeError(
            "RedisTier keys must be built from str, bytes, int, float, bool, None, classes, "
            "tuples and frozensets (so every process derives the same Redis key); got "
            f"{type(obj).__qualname__} in the key. Use key=... to build such a key"
        )


def key_digest(key: Hashable) -> str:
    """key_digest is the sha256 (hex) of a canonical encoding of a Group key."""
    out = bytearray()
    _canon(key, out)
    return hashlib.sha256(out).hexdigest()


@final
@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us on every call's path
class Keys:
    """Redis names for one key: ``<ns>:{<sha256>}:v|lease|r:<token>`` and channel ``...:c``.

    The braces are a Redis Cluster hash tag, so one key's names share a slot. Only the digest
    of the Group key appears: no URL, header or credential ever becomes part of a Redis name.
    """

    value: str
    lease: str
    channel: str
    result_prefix: str

    @classmethod
    def of(cls, namespace: str, digest: str) -> Keys:
        base = f"{namespace}:{{{digest}}}:"
        return cls(base + "v", base + "lease", base + "c", base + "r:")

    def result(self, token: str) -> str:
        return self.result_prefix + token


# -- default codec ---------------------------------------------------------------------------

_TYPE_HINT: Final = (
    "RedisTier's default codec stores bytes, str and JSON values (dict with str keys, list, "
    "str, int, float, bool, None) that survive a JSON round trip"
)


@final
class DefaultCodec:
    """DefaultCodec stores bytes, str and JSON values; anything else raises TypeError.

    Values must come back equal in another process, so a value that JSON would change
    (a tuple becomes a list, an int dict key becomes a str, NaN) is refused, not altered.
    """

    __slots__ = ()

    def encode(self, value: Any, /) -> bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return b"b" + bytes(value)
        if isinstance(value, str):
            return b"s" + value.encode("utf-8", "surrogatepass")
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{_TYPE_HINT}; got {type(value).__qualname__} ({exc}). Return one of those, "
                "or pass Group(codec=...) an object with encode(value) -> bytes and "
                "decode(bytes) -> value"
            ) from None
        if json.loads(text) != value:  # == tells a tuple from a list, 1 from "1"
            raise TypeError(
                f"{_TYPE_HINT}; got a {type(value).__qualname__} that JSON would change "
                "(tuples come back as lists, non-str dict keys as str). Convert it first, or "
                "pass Group(codec=...)"
            )
        return b"j" + text.encode()

    def decode(self, data: bytes, /) -> Any:
        tag, rest = data[:1], data[1:]
        if tag == b"b":
            return bytes(rest)
        if tag == b"s":
            return rest.decode("utf-8", "surrogatepass")
        if tag == b"j":
            return json.loads(rest)
        raise ValueError(f"unknown value tag {tag!r}")


DEFAULT_CODEC: Final = DefaultCodec()
