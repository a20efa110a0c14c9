"""The tier's protocol steps (lookup, lead, renew, settle, follow), stated once and free of I/O.

``lookup`` and ``follow`` are generators: they yield the Redis operations they need (``Get``,
``Eval``, ``Listen``, ``Wait``, ``UNLISTEN``) and receive each one's result, so the asyncio
driver (``_aio``) and the threads driver (``_threads``) run the same steps, each with its own
I/O. ``lookup`` returns a decision: ``Served`` (a value from Redis or another process), ``Lead``
(this process holds the lease: call upstream), ``Refresh`` (serve the stale value, refresh in
the background) or ``ALONE`` (nothing to share: make your own call). The leader's steps are
``renewal``, ``outcome`` (what to store) and ``finish`` (the FINISH call), driven the same way.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, final

from .._group import Codec, Unshared
from ._core import Core
from ._format import BadRecord, Keys, decode_record, encode_record

__all__ = (
    "ALONE",
    "MISS",
    "UNLISTEN",
    "UNREADABLE",
    "Eval",
    "Get",
    "Lead",
    "Lease",
    "Listen",
    "Op",
    "Refresh",
    "Served",
    "Steps",
    "Wait",
    "bare",
    "extend",
    "finish",
    "follow",
    "hit",
    "lookup",
    "outcome",
)

log = logging.getLogger("singleflight.redis")


# -- operations a step asks its driver for ---------------------------------------------------


@final
@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us on the hot path
class Get:
    """GET one name; the result is its bytes or None."""

    name: str


@final
@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us on the hot path
class Eval:
    """Run one of ``_scripts.SCRIPTS`` (EVALSHA; loaded on the key's node on NOSCRIPT)."""

    script: str
    keys: list[str]
    args: list[Any]


@final
@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us on the hot path
class Listen:
    """Subscribe to a key's channel; returns once Redis acknowledged it (or ack_timeout)."""

    channel: bytes


@final
@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us on the hot path
class Wait:
    """Wait for a message on the listened channel, at most ``seconds``."""

    seconds: float


@final
class _Unlisten:
    """Drop the listener (the driver also drops it if the steps end otherwise)."""

    __slots__ = ()


UNLISTEN: Final = _Unlisten()
Op: TypeAlias = "Get | Eval | Listen | Wait | _Unlisten"
Steps: TypeAlias = "Generator[Op, Any, Any]"


# -- decisions lookup returns ----------------------------------------------------------------


@final
@dataclass(slots=True)
class Lease:
    """A lease this process holds on one key: its names and our token."""

    keys: Keys
    token: str
    lost: bool = False  # set once the lease is known to have expired under us


@final
@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us on the hot path
class Served:
    """A value for the caller: role ``"shared"`` (Redis), ``"remote"`` or ``"stale"``."""

    value: Any
    role: str


@final
@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us on the hot path
class Lead:
    """This process holds the lease: call upstream for the fleet."""

    lease: Lease


@final
@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us on the hot path
class Refresh:
    """Serve ``value`` stale now; this process won the lease to refresh it in the background."""

    lease: Lease
    value: Any


@final
class _Alone:
    __slots__ = ()


ALONE: Final = _Alone()  # nothing to share: make your own call, outside the fleet
_RETRY: Final = object()  # the holder is gone or abandoned: run LOOKUP again
_ERR: Final = object()  # the holder's work raised


# -- the steps -------------------------------------------------------------------------------


MISS: Final = object()  # hit(): no value; run lookup()
UNREADABLE: Final = object()  # hit(): a value this version cannot read; lookup() replaces it


def hit(core: Core, raw: bytes | None, codec: Codec[Any]) -> Any:
    """The first step when ``stale_ttl`` is 0: the value GET found, or MISS / UNREADABLE.

    Without stale_ttl a value is fresh for as long as it exists, so an L2 hit needs only a
    plain GET (``Get(keys.value)``, run by the driver without the generator: the hot path);
    a miss pays one more round trip (before an upstream call).
    """
    if raw is None:
        return MISS
    try:
        value = decode_value(raw, codec)
    except BadRecord as exc:
        log.debug("singleflight: unreadable value (%s); replacing it", exc)
        return UNREADABLE
    core.shared_hits += 1
    return value


def lookup(core: Core, keys: Keys, codec: Codec[Any], got: Any = MISS) -> Steps:
    """One local leader's way to a decision: the shared value, a remote flight, or the lease.

    ``got``: what ``hit`` said, if the driver ran it (UNREADABLE: LOOKUP ignores the value).
    """
    settings = core.settings
    skip_value = "1" if got is UNREADABLE else "0"
    token = secrets.token_hex(16)
    followed = False
    errors = 0
    while True:
        res = yield Eval(
            "lookup",
            [keys.value, keys.lease],
            [token, settings.lease_ms, settings.stale_ms, skip_value],
        )
        kind = res[0]
        if kind == b"lead":
            if followed:
                core.takeovers += 1
            return Lead(Lease(keys, token))
        if kind == b"follow":
            if not followed:
                followed = True
                core.remote_follows += 1
            got = yield from follow(core, keys, res[1].decode(), codec)
            if isinstance(got, Served):
                return got
            if got is _ERR:
                # Exceptions do not travel between processes: try one more flight, then
                # make our own call so our caller sees its own error.
                errors += 1
                if errors < 2:
                    continue
            if got is _RETRY:
                continue
            return ALONE
        try:
            value = decode_value(res[1], codec)
        except BadRecord as exc:
            log.debug("singleflight: unreadable value (%s); replacing it", exc)
            if kind == b"stale_lead":
                return Lead(Lease(keys, token))
            skip_value = "1"
            continue
        if kind == b"fresh":
            core.shared_hits += 1
            return Served(value, "shared")
        core.stale_served += 1
        if kind == b"stale_lead":
            return Refresh(Lease(keys, token), value)
        return Served(value, "stale")


def follow(core: Core, keys: Keys, holder: str, codec: Codec[Any]) -> Steps:
    """Wait for another process's flight: subscribe, re-check, wait for a message or a poll."""
    settings = core.settings
    yield Listen(keys.channel.encode())
    interval = settings.poll_min
    while True:
        # After the SUBSCRIBE ack, re-check: a PUBLISH sent between LOOKUP and the ack was
        # not delivered to us, but its result is visible here (uv #3724).
        res = yield Eval("check", [keys.value, keys.lease, keys.result(holder)], [holder])
        kind = res[0]
        got: Any = None
        if kind == b"value":
            try:
                got = Served(decode_value(res[1], codec), "remote")
            except BadRecord:
                got = ALONE
        elif kind == b"result":
            got = _result(res[1], codec)
        elif kind == b"gone":
            if not res[1]:
                got = _RETRY  # no lease, no result: the holder died; take over
            else:
                holder = res[1].decode()  # someone else took over already: follow them
                continue
        if got is not None:
            yield UNLISTEN
            return got
        yield Wait(interval * random.uniform(0.8, 1.2))
        interval = min(interval * 2, settings.poll_max)


def _result(data: bytes, codec: Codec[Any]) -> Any:
    try:
        record = decode_record(data)
    except BadRecord:
        return ALONE
    if record.status == "ok":
        try:
            return Served(codec.decode(record.payload), "remote")
        except Exception:
            return ALONE
    if record.status == "err":
        return _ERR
    if record.status == "abandon":
        return _RETRY
    return ALONE  # "unshared", or a status from a newer version


def decode_value(data: bytes, codec: Codec[Any]) -> Any:
    record = decode_record(data)
    if record.status != "ok":
        raise BadRecord(f"status {record.status!r} in a value")
    try:
        return codec.decode(record.payload)
    except Exception as exc:
        raise BadRecord(f"codec failed: {exc!r}") from None


# -- the leader's steps ----------------------------------------------------------------------


def extend(core: Core, lease: Lease) -> Eval:
    """The renewal call (every lease_ttl/3); a 0 result means the lease was lost."""
    return Eval("extend", [lease.keys.lease], [lease.token, core.settings.lease_ms])


def outcome(
    core: Core, value: Any, codec: Codec[Any], cacheable: Callable[[Any], bool] | None
) -> tuple[str, bytes, int]:
    """What FINISH stores for the leader's value: ``(mode, record, px)``.

    Raises the codec's error for a value it cannot store (the caller settles ``bare
    ("unshared")`` then, so the followers make their own calls).
    """
    settings = core.settings
    if type(value) is Unshared:
        return "result", encode_record("unshared"), settings.result_ms
    record = encode_record("ok", codec.encode(value))
    if settings.value_ms is not None and (cacheable is None or cacheable(value)):
        return "value", record, settings.value_ms
    return "result", record, settings.result_ms


def bare(core: Core, status: str) -> tuple[str, bytes, int]:
    """A FINISH without a value: ``"err"``, ``"unshared"`` or ``"abandon"``."""
    return "result", encode_record(status), core.settings.result_ms


def finish(core: Core, lease: Lease, settled: tuple[str, bytes, int]) -> Eval:
    """Store the outcome, drop the lease if still ours and publish, in one FINISH call."""
    mode, record, px = settled
    keys = lease.keys
    return Eval(
        "finish",
        [keys.value, keys.lease, keys.result(lease.token)],
        [lease.token, mode, record, px, keys.channel, core.publish],
    )
