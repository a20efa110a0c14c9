"""Options are checked when the middleware is built; the module fails clearly without aiohttp."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import cachetools
import pytest
from _aiohttp_support import bounded, joined

from singleflight import Group
from singleflight.aiohttp import SingleflightMiddleware, http_group, served

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"ttl": 0}, ValueError, "ttl"),
        ({"ttl": -1.0}, ValueError, "ttl"),
        ({"ttl": "5"}, TypeError, "ttl"),
        ({"maxsize": 0, "ttl": 1.0}, ValueError, "maxsize"),
        ({"methods": "GET"}, TypeError, "methods"),
        ({"methods": ("GET", "NOT A METHOD")}, ValueError, "methods"),
        ({"ignore_headers": {"authorization"}}, ValueError, "authorization"),
        ({"ignore_headers": "traceparent"}, TypeError, "ignore_headers"),
        ({"key": "url"}, TypeError, "key"),
        ({"cache": []}, TypeError, "cache"),
        ({"cache": {}, "ttl": 5.0}, ValueError, "cache="),
        ({"max_body_size": -1}, ValueError, "max_body_size"),
        ({"group": object()}, TypeError, "group"),
        ({"group": Group(), "ttl": 5.0}, ValueError, "group="),
    ],
)
def test_bad_options_fail_at_construction(kwargs, error, names):
    with pytest.raises(error, match=names):
        SingleflightMiddleware(**kwargs)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        SingleflightMiddleware(("GET",))  # type: ignore[misc]


async def test_a_shared_group_coalesces_across_middlewares(upstream, make_session):
    group = http_group(cache=cachetools.TTLCache(maxsize=8, ttl=60))  # a Group built for HTTP
    a, b = SingleflightMiddleware(group=group), SingleflightMiddleware(group=group)
    assert a.group is group and b.group is group
    sa, sb = make_session(a), make_session(b)
    url = upstream.url + "/grp?gate=grp"
    tasks = [asyncio.create_task(s.get(url)) for s in (sa, sb, sa, sb)]
    await upstream.wait_for_hits_async(1, "/grp")
    await joined(a, 3)
    upstream.open_gate("grp")
    responses = await bounded(asyncio.gather(*tasks))
    assert upstream.hits("/grp") == 1
    async with sb.get(url) as again:
        assert served(again) == "cache"
    assert {r.status for r in responses} == {200}


def test_import_error_names_the_extra():
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "try:\n"
        "    import singleflight.aiohttp\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    # Quoted: unquoted brackets are a glob in zsh ("no matches found").
    assert 'pip install "singleflight-http[aiohttp]"' in out.stdout


def test_importing_singleflight_does_not_import_aiohttp():
    code = "import sys, singleflight; print('aiohttp' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "False"


async def test_the_class_itself_as_a_middleware_says_to_pass_an_instance(upstream, make_session):
    session = make_session(middlewares=(SingleflightMiddleware,))  # the class, not an instance
    with pytest.raises(TypeError, match=r"middlewares=\(SingleflightMiddleware\(\),\)"):
        await session.get(upstream.url + "/x")
    with pytest.raises(TypeError, match="keyword-only"):
        SingleflightMiddleware(30)  # type: ignore[misc]
