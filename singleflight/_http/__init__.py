"""What both HTTP adapters share, with no client library: key, rules, snapshot, options, timing.

The policy in one place. Every adapter follows it, so httpx and aiohttp callers of one Group (or
one Redis tier) agree on what is the same request and what may be shared:

    request  --bypass_reason()------> None: coalesce / "why": pass straight through, untouched
             --request_key()--------> RequestKey (method, normalised URL, digest of headers, extra)
    response --unshareable_reason()-> None: buffer into a Snapshot and share with the flight
                                      "why": leader only (Unshared), followers make their own call
    Snapshot --is_cacheable()-------> may the TTL layer / Redis tier keep it?

One concept a module: ``key`` (what separates callers), ``rules`` (bypass / never shared /
cacheable, which URLs a write invalidates), ``snapshot`` (the shared response and its codec),
``options`` (checked adapter options and their Group), ``timing`` (a follower's own read
timeout), ``invalidation`` (a write drops a group's cached reads of the URLs it changed),
``freshness`` (Cache-Control times for ``ttl="headers"``), ``stale`` (``stale_ttl=``: options,
refreshes);
``headers`` holds the header-pair helpers they all read with.
"""

from .headers import HeaderPairs as HeaderPairs
from .key import (
    CREDENTIAL_HEADERS as CREDENTIAL_HEADERS,
    DEFAULT_IGNORE_HEADERS as DEFAULT_IGNORE_HEADERS,
    HeaderFilter as HeaderFilter,
    RequestKey as RequestKey,
    key_from_parts as key_from_parts,
    normalise_url as normalise_url,
    request_key as request_key,
)
from .options import HTTPOptions as HTTPOptions, http_group as http_group
from .rules import (
    CACHEABLE_STATUSES as CACHEABLE_STATUSES,
    DEFAULT_MAX_BODY_SIZE as DEFAULT_MAX_BODY_SIZE,
    DEFAULT_METHODS as DEFAULT_METHODS,
    ClientClosed as ClientClosed,
    bypass_reason as bypass_reason,
    invalidated_urls as invalidated_urls,
    is_cacheable as is_cacheable,
    unshareable_reason as unshareable_reason,
)
from .snapshot import (
    SNAPSHOT_CODEC as SNAPSHOT_CODEC,
    Snapshot as Snapshot,
    SnapshotCodec as SnapshotCodec,
)
from .timing import Deadline as Deadline, Progress as Progress, progress_of as progress_of

__all__ = (
    "CACHEABLE_STATUSES",
    "CREDENTIAL_HEADERS",
    "DEFAULT_IGNORE_HEADERS",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_METHODS",
    "SNAPSHOT_CODEC",
    "ClientClosed",
    "Deadline",
    "HTTPOptions",
    "HeaderFilter",
    "HeaderPairs",
    "Progress",
    "RequestKey",
    "Snapshot",
    "SnapshotCodec",
    "bypass_reason",
    "http_group",
    "invalidated_urls",
    "is_cacheable",
    "key_from_parts",
    "normalise_url",
    "progress_of",
    "request_key",
    "unshareable_reason",
)
