"""The daemon's control socket (``unix:///…/api.sock``): requests, streams
and terminals over it, sync and asyncio."""

import asyncio
import os

import pytest

from bhatti import AsyncBhatti, Bhatti

pytestmark = pytest.mark.daemon


@pytest.fixture
def socket_url():
    sock = os.environ.get("BHATTI_TEST_SOCKET")
    if not sock:
        pytest.skip("needs BHATTI_TEST_SOCKET (the cargo test sdk_python sets it)")
    return f"unix://{sock}"


def test_sync_over_the_socket(socket_url, sb):
    with Bhatti(url=socket_url) as c:
        assert c.api_url == socket_url
        assert c.health().status == "ok"
        s = c.get(sb.name)
        assert s.exec(["echo", "via-socket"]).stdout == "via-socket\n"
        assert [e.text for e in s.exec_stream(["echo", "streamed"]) if e.type == "stdout"] == \
            ["streamed\n"]
        with s.terminal() as term:
            term.send("echo $((6*7))\n")
            assert b"42\r\n" in term.read_until(b"42\r\n")


def test_async_over_the_socket(socket_url, sb):
    async def scenario():
        async with AsyncBhatti(url=socket_url) as c:
            s = await c.get(sb.name)
            assert (await s.exec(["echo", "a"])).stdout == "a\n"
            async with await s.terminal() as term:
                await term.send("echo $((6*7))\n")
                await term.read_until(b"42\r\n")

    asyncio.run(scenario())
