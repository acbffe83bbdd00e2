"""The asyncio client against a real daemon: every method once."""

import asyncio
import hashlib
import os
import time

import pytest

import bhatti
from bhatti import AsyncBhatti
from conftest import unique

pytestmark = pytest.mark.daemon


async def scenario():
    async with AsyncBhatti() as client:
        assert (await client.health()).status == "ok"
        await client.secrets.set("ASYNC_SECRET", "v1")
        assert "ASYNC_SECRET" in [s.name for s in await client.secrets.list()]
        sb = await client.create(name=unique("async"), env={"A": "b"}, secrets=["ASYNC_SECRET"])
        try:
            assert (await client.get(sb.name)).id == sb.id
            assert sb.id in [s.id for s in await client.list()]
            await sb.update(keep_hot=True)
            assert (await sb.refresh()).info.keep_hot

            r = await sb.exec("echo $A $ASYNC_SECRET; echo e >&2; exit 2", cwd="/tmp")
            assert (r.exit_code, r.stdout, r.stderr) == (2, "b v1\n", "e\n")
            assert (await sb.exec(["cat"], stdin="in")).stdout == "in"
            assert (await sb.exec(["sleep", "30"], timeout=1)).timed_out

            t0 = time.monotonic()
            times = []
            async for ev in sb.exec_stream("for i in 1 2 3 4; do echo $i; sleep 1; done"):
                if ev.type == "stdout":
                    times.append(time.monotonic() - t0)
                last = ev
            assert last.type == "exit" and last.exit_code == 0
            assert times[-1] - times[0] > 2.5, times

            got = []

            async def on_out(b):
                got.append(b)

            r = await sb.exec(["sh", "-c", "echo x; sleep 1; echo y"], on_stdout=on_out,
                              on_stderr=lambda b: None)
            assert b"".join(got) == b"x\ny\n" and r.stdout == "x\ny\n"

            d = await sb.exec_detached("echo bg", output_file="/tmp/async-bg.log")
            assert d.pid > 0

            data = os.urandom(1 << 20)
            await sb.files.write("/workspace/a.bin", data)
            assert await sb.files.read("/workspace/a.bin") == data
            assert (await sb.exec(["sha256sum", "/workspace/a.bin"])).stdout.split()[0] == \
                hashlib.sha256(data).hexdigest()
            await sb.files.write("/workspace/t.txt", "text")
            assert await sb.files.read_text("/workspace/t.txt") == "text"
            assert "t.txt" in [e.name for e in await sb.files.list("/workspace")]
            assert (await sb.files.stat("/workspace/t.txt")).size == 4
            try:
                await sb.files.read("/workspace/none")
                raise AssertionError("no NotFound")
            except bhatti.NotFound as e:
                assert e.status == 404

            async with await sb.terminal() as term:
                sid = await term.wait_session()
                await term.send("echo $((6*7))\n")
                await term.read_until(b"42\r\n")
                await term.resize(40, 120)
                await term.send("stty size\n")
                await term.read_until(b"40 120")
            assert sid in [s.session_id for s in await sb.sessions.list()]
            await sb.sessions.kill(sid)
            try:
                await sb.terminal(session="no-such-session")
                raise AssertionError("no NotFound")
            except bhatti.NotFound:
                pass

            await sb.exec_detached(["python3", "-m", "http.server", "8766"])
            deadline = time.monotonic() + 30
            while 8766 not in [p.port for p in await sb.ports()]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.3)
            pub = await sb.publish(8766)
            assert [p.alias for p in await sb.published()] == [pub.alias]
            await sb.unpublish(8766)
            assert await sb.published() == []

            share = await sb.share()
            assert share.url.endswith(f"/_shell/{sb.id}#token={share.token}")
            await sb.revoke_share()

            assert (await sb.stop()).status == "stopped"
            assert (await sb.start()).status == "running"
        finally:
            await sb.destroy()
        try:
            await client.get(sb.id)
            raise AssertionError("destroyed sandbox still there")
        except bhatti.NotFound:
            pass
        await client.secrets.delete("ASYNC_SECRET")


def test_async_client_every_method():
    asyncio.run(scenario())
