"""Faults through every adapter: 1 leader + 20 followers meet a misbehaving upstream.

For each fault and each adapter (httpx async, httpx sync with threads, aiohttp), with a TTL
cache configured: every caller gets a response or an error within its own timeout; a leader's
own timeout re-elects; no pooled connection stays held; nothing is cached; the very next request
for the key goes upstream afresh; nothing is left in flight. docs/faults.md is the table of what
each caller sees (``KINDS`` below).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from fault_support import ADAPTERS, Driver, Outcome, bounded, make_driver, wait_until

pytestmark = pytest.mark.timeout(60)

FOLLOWERS = 20
T = 0.3  # the callers' read timeout (httpx read=, aiohttp sock_read=)
PATIENT = 5.0  # the read timeout where the fault is not about timeouts
SLACK = 0.5  # scheduling noise allowed on top of a timeout (a loaded CI box)
PROMPT = 1.0  # a fault that is not a timeout reaches every caller within this after it strikes


@dataclass(frozen=True)
class Fault:
    path: str
    server: str  # "raw": FaultServer, "loopback": LoopbackUpstream, "closed": nothing listens
    kinds: tuple[str, str, str]  # what every caller gets: httpx async, httpx sync, aiohttp
    hits: tuple[int, ...] = (1,)  # upstream requests the burst may make
    leader_timeout: float = PATIENT
    follower_timeout: float = PATIENT

    @property
    def timeout(self) -> bool:
        return "Timeout" in self.kinds[0]


HTTPX_PROTOCOL = ("RemoteProtocolError", "RemoteProtocolError")
FAULTS = {
    "connection refused": Fault(
        "/refused", "closed", ("ConnectError", "ConnectError", "ClientConnectorError"), (0,)
    ),
    # aiohttp retries an idempotent request once after ClientOSError: every caller retries at
    # once, so the retry is one flight as well (2 upstream requests for 21 callers).
    "reset before headers": Fault(
        "/reset", "raw", ("ReadError", "ReadError", "ClientOSError"), (1, 2)
    ),
    "reset mid-body": Fault("/body?reset=100", "loopback", (*HTTPX_PROTOCOL, "ClientPayloadError")),
    "malformed status line": Fault("/malformed", "raw", (*HTTPX_PROTOCOL, "ClientResponseError")),
    "not HTTP at all": Fault("/garbage", "raw", (*HTTPX_PROTOCOL, "ClientResponseError")),
    # Headers at once, then one byte every 2T: the leader's read timeout (T) fires mid-body.
    # Followers (T too) saw the headers arrive, so their read timeout starts over once, then
    # the silence ends their wait; a follower re-elected before that asks again (2 requests).
    "trickling body": Fault(
        "/trickle?gap=0.6",
        "raw",
        ("ReadTimeout", "ReadTimeout", "SocketTimeoutError"),
        (1, 2),
        leader_timeout=T,
        follower_timeout=T,
    ),
    # The upstream never answers. The leader (T) times out first: a follower (1 s) is
    # re-elected and asks again, then times out after its own 1 s; the others give up at theirs.
    "leader hangs until its timeout": Fault(
        "/hang",
        "raw",
        ("ReadTimeout", "ReadTimeout", "SocketTimeoutError"),
        (2,),
        leader_timeout=T,
        follower_timeout=1.0,
    ),
}


# What each row did, printed as the fault table at the end of the module (run with -s).
RESULTS: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module", autouse=True)
def fault_table():
    yield
    if RESULTS:
        rows = sorted({f for f, _ in RESULTS}, key=list(FAULTS).index)
        print("\n| fault | " + " | ".join(ADAPTERS) + " |")
        print("|---|" + "---|" * len(ADAPTERS))
        for row in rows:
            cells = [RESULTS.get((row, a), "") for a in ADAPTERS]
            print(f"| {row} | " + " | ".join(cells) + " |")


def kind_of(fault: Fault, adapter: str) -> str:
    return fault.kinds[ADAPTERS.index(adapter)]


async def burst(driver: Driver, url: str, fault: Fault) -> tuple[list[Outcome], float]:
    """1 leader + FOLLOWERS followers on ``url``; returns their outcomes and the release time."""
    leader = driver.call(url, fault.leader_timeout)
    await wait_until(lambda: driver.reached == 1, "the leader at the hold")
    followers = [driver.call(url, fault.follower_timeout) for _ in range(FOLLOWERS)]
    await wait_until(lambda: driver.stats.followers == FOLLOWERS, "the followers to join")
    released = time.monotonic()
    driver.release()
    return [await bounded(f) for f in (leader, *followers)], released


@pytest.mark.parametrize("name", list(FAULTS))
async def test_fault(name, driver: Driver, faults, upstream):
    fault = FAULTS[name]
    base = {"raw": faults.url, "loopback": upstream.url, "closed": "http://127.0.0.1:9"}
    url = base[fault.server] + fault.path
    hits = faults.hits if fault.server == "raw" else upstream.hits

    outcomes, released = await burst(driver, url, fault)

    # Every caller gets the error, each a fresh object of its own (chained to the leader's),
    # never a response produced for someone else.
    expected = kind_of(fault, driver.name)
    assert [o.kind for o in outcomes] == [expected] * (FOLLOWERS + 1), outcomes
    assert len({id(o.error) for o in outcomes}) == FOLLOWERS + 1  # each its own exception
    infos = [o.error.request_info for o in outcomes if hasattr(o.error, "request_info")]
    assert len({id(i) for i in infos}) == len(infos)  # ... about its own request (aiohttp)
    assert hits() in fault.hits
    # ... within its own timeout: a follower's wait is bounded by its own read timeout, plus
    # the leader's when it was re-elected and made the request itself.
    worst = fault.leader_timeout + fault.follower_timeout + SLACK if fault.timeout else PROMPT
    assert max(o.ended for o in outcomes) - released <= worst, [o.elapsed for o in outcomes]
    if fault.timeout:
        assert outcomes[0].elapsed <= (released - outcomes[0].started) + T + SLACK
        for o in outcomes[1:]:
            assert o.elapsed <= fault.follower_timeout + fault.leader_timeout + SLACK
        assert driver.stats.reelections >= 1  # the leader's own timeout handed the flight on
        assert driver.stats.errors == 0  # ... and was never shared as the flight's outcome
    else:
        assert driver.stats.errors == max(hits(), 1)  # one error per flight, shared
    done = max(o.ended for o in outcomes) - released
    RESULTS[name, driver.name] = f"{expected} x{FOLLOWERS + 1}, {hits()} upstream, {done:.2f} s" + (
        f", {driver.stats.reelections} re-election(s)" if driver.stats.reelections else ""
    )
    assert driver.group.in_flight == 0
    assert len(driver.group.cache) == 0  # ttl=60 is set: an error is never cached
    await wait_until(driver.idle, "no pooled connection held")
    if fault.server == "raw":  # the server side agrees: every faulty connection was closed
        await wait_until(lambda: faults.open_connections == 0, "the server's sockets closed")

    # No poisoned key: the very next request for it goes upstream afresh, as a leader.
    faults.heal()
    reached, before = driver.reached, hits()
    after = await bounded(driver.call(url, 5.0))
    assert driver.reached == reached + 1
    assert hits() == before + (fault.server != "closed")
    if fault.server == "raw":  # healed: a good response, which the TTL layer now keeps
        assert (after.kind, after.role) == ("200", "leader")
        assert len(driver.group.cache) == 1
    else:
        assert after.kind == expected
        assert len(driver.group.cache) == 0
    assert driver.group.in_flight == 0


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_leader_hangs_until_its_timeout_then_the_upstream_recovers(adapter, upstream):
    # The re-elected follower's request is answered: every other follower shares that answer.
    driver = make_driver(adapter)
    try:
        url = upstream.url + "/recover?gate=recover"
        leader = driver.call(url, T)
        await wait_until(lambda: driver.reached == 1, "the leader at the hold")
        followers = [driver.call(url, 10.0) for _ in range(FOLLOWERS)]
        await wait_until(lambda: driver.stats.followers == FOLLOWERS, "the followers to join")
        driver.release()
        first = await bounded(leader)
        assert first.kind == kind_of(FAULTS["leader hangs until its timeout"], adapter)
        assert first.elapsed <= 5.0
        await upstream.wait_for_hits_async(2, "/recover")  # a follower took over
        upstream.open_gate("recover")
        rest = [await bounded(f) for f in followers]
        assert {o.kind for o in rest} == {"200"}
        assert sorted(o.role or "" for o in rest) == ["follower"] * (FOLLOWERS - 1) + ["leader"]
        assert {o.body for o in rest} == {rest[0].body} and b'"hit": 2' in rest[0].body
        assert upstream.hits("/recover") == 2
        assert driver.stats.reelections == 1 and driver.stats.errors == 0
        assert driver.group.in_flight == 0
        await wait_until(driver.idle, "no pooled connection held")
    finally:
        await driver.aclose()


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_5xx_storm(adapter, upstream):
    # Waves of callers on four keys whose upstream answers 500, 502, 503 and 504: each wave
    # makes one upstream request per key, everyone gets their key's status, nothing is cached.
    driver = make_driver(adapter, ttl=60.0)
    statuses = (500, 502, 503, 504)
    waves = 3
    try:
        for wave in range(waves):
            urls = [f"{upstream.url}/storm{s}?status={s}" for s in statuses]
            reached = driver.reached
            calls = [driver.call(u, 5.0) for u in urls for _ in range(FOLLOWERS + 1)]
            await wait_until(lambda: driver.reached == reached + len(urls), "the leaders")  # noqa: B023
            n = len(calls) - len(urls)
            await wait_until(lambda: driver.stats.followers == (wave + 1) * n, "the followers")  # noqa: B023
            driver.release()
            outcomes = [await bounded(c) for c in calls]
            for i, s in enumerate(statuses):
                mine = outcomes[i * (FOLLOWERS + 1) : (i + 1) * (FOLLOWERS + 1)]
                assert {o.kind for o in mine} == {str(s)}
                assert sorted(o.role or "" for o in mine) == ["follower"] * FOLLOWERS + ["leader"]
                assert upstream.hits(f"/storm{s}") == wave + 1
            assert len(driver.group.cache) == 0 and driver.group.in_flight == 0
            await wait_until(driver.idle, "no pooled connection held")
            driver.hold_again()
        assert driver.stats.errors == 0  # a status is a response, not an error
    finally:
        await driver.aclose()


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_slow_but_steady_response_reaches_every_follower(adapter, faults):
    # Headers after 0.2 s, then a byte every 0.15 s for 1.2 s: never silent for a whole read
    # timeout (T), though it takes far longer than T in all. A lone caller would get it, so
    # followers must too: their wait ends only when the shared request is silent for T.
    driver = make_driver(adapter)
    try:
        url = faults.url + "/steady?head=0.2&gap=0.15&n=8"
        driver.release()  # no hold: the followers join while the response is on its way
        leader = driver.call(url, T)
        await faults.wait_for_hits_async(1)
        joined = time.monotonic()
        followers = [driver.call(url, T) for _ in range(FOLLOWERS)]
        outcomes = [await bounded(f) for f in (leader, *followers)]
        assert [(o.kind, o.body) for o in outcomes] == [("200", b"s" * 8)] * (FOLLOWERS + 1)
        assert sorted(o.role or "" for o in outcomes) == ["follower"] * FOLLOWERS + ["leader"]
        assert faults.hits() == 1 and driver.stats.reelections == 0
        assert max(o.ended for o in outcomes) - joined <= 1.4 + SLACK
        assert driver.group.in_flight == 0
        await wait_until(driver.idle, "no pooled connection held")
    finally:
        await driver.aclose()
