"""Observability: debug records on the "singleflight" logger, and OpenTelemetry counters."""

from __future__ import annotations

import asyncio
import logging

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from singleflight import Group
from singleflight._observe import note_call

READER = InMemoryMetricReader()
SPANS = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def otel_sdk() -> None:
    # Global providers can be set once per process; this module is their only user.
    metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(SPANS))
    trace.set_tracer_provider(provider)


def counters() -> dict[tuple[str, tuple[tuple[str, object], ...]], int]:
    out: dict[tuple[str, tuple[tuple[str, object], ...]], int] = {}
    data = READER.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    out[(m.name, tuple(sorted(p.attributes.items())))] = int(p.value)
    return out


async def test_a_shared_flight_logs_once_when_it_lands(caplog: pytest.LogCaptureFixture) -> None:
    group: Group[int] = Group()
    release = asyncio.Event()

    async def work() -> int:
        await release.wait()
        return 1

    caplog.set_level(logging.DEBUG, logger="singleflight")
    tasks = [asyncio.create_task(group.do("k", work)) for _ in range(3)]
    while group.stats.calls < 3:
        await asyncio.sleep(0)
    release.set()
    async with asyncio.timeout(5):
        assert await asyncio.gather(*tasks) == [1, 1, 1]
    landed = [r.getMessage() for r in caplog.records if "landed" in r.getMessage()]
    assert landed == ["flight 'k' landed: 1 leader, 2 follower(s)"]


async def test_an_uncontended_flight_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    group: Group[int] = Group()

    async def work() -> int:
        return 1

    caplog.set_level(logging.DEBUG, logger="singleflight")
    assert await group.do("k", work) == 1
    assert [r for r in caplog.records if r.name == "singleflight"] == []


async def test_a_reelection_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    group: Group[int] = Group()
    started = asyncio.Event()

    async def work() -> int:
        started.set()
        await asyncio.sleep(3600)  # until cancelled
        return 0

    async def quick() -> int:
        return 2

    caplog.set_level(logging.DEBUG, logger="singleflight")
    before = counters().get(("singleflight.reelections", ()), 0)
    leader = asyncio.create_task(group.do("k", work))
    await started.wait()
    follower = asyncio.create_task(group.do("k", quick))
    while group.stats.followers < 1:
        await asyncio.sleep(0)
    leader.cancel()
    async with asyncio.timeout(5):
        assert await follower == 2
    assert group.stats.reelections == 1
    assert any("re-electing" in r.getMessage() for r in caplog.records)
    assert counters()[("singleflight.reelections", ())] == before + 1


def test_note_call_sets_the_span_role_and_counts_by_role_and_reason() -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("request"):
        note_call("follower")
    with tracer.start_as_current_span("other"):
        note_call("bypass", "method")
    spans = {s.name: s for s in SPANS.get_finished_spans()}
    assert spans["request"].attributes["singleflight.role"] == "follower"
    assert spans["other"].attributes["singleflight.role"] == "bypass"
    c = counters()
    assert c[("singleflight.calls", (("role", "follower"),))] >= 1
    assert c[("singleflight.followers", ())] >= 1
    assert c[("singleflight.bypasses", (("reason", "method"),))] >= 1


def test_note_call_never_logs_values(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="singleflight")
    note_call("bypass", "body")
    assert [r.getMessage() for r in caplog.records] == ["call bypassed: body"]
