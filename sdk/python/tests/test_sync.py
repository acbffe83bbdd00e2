"""The blocking client against a real daemon."""

import hashlib
import os
import time

import httpx
import pytest

import bhatti
from bhatti import Bhatti
from conftest import unique

pytestmark = pytest.mark.daemon


def test_health(client, sb):
    h = client.health()
    assert h.status == "ok" and h.sandboxes >= 1


def test_create_get_list_update_destroy_with_env_and_secrets(client):
    client.secrets.set("SDK_SECRET", "s3cret-value")
    assert "SDK_SECRET" in [s.name for s in client.secrets.list()]
    name = unique("life")
    sb = client.create(name=name, cpus=1, memory_mb=512, env={"GREETING": "hello"},
                       secrets=["SDK_SECRET"], labels={"team": "sdk"})
    try:
        assert sb.status == "running" and sb.name == name and sb.info.memory_mb == 512
        assert sb.info.labels == {"team": "sdk"} and sb.info.thermal == "hot"
        assert [x.id for x in client.list(labels={"team": "sdk"})] == [sb.id]
        assert client.list(labels={"team": "other"}) == []
        assert client.get(name).id == sb.id and client.get(sb.id).name == name
        assert sb.id in [s.id for s in client.list()]
        r = sb.exec(["sh", "-c", "echo $GREETING $SDK_SECRET"])
        assert r.stdout == "hello s3cret-value\n"
        renamed = name + "-b"
        sb.update(name=renamed, keep_hot=True)
        assert sb.name == renamed and sb.info.keep_hot is True
        assert sb.refresh().name == renamed
    finally:
        sb.destroy()
    with pytest.raises(bhatti.NotFound) as e:
        client.get(sb.id)
    assert e.value.status == 404
    client.secrets.delete("SDK_SECRET")
    assert "SDK_SECRET" not in [s.name for s in client.secrets.list()]
    with pytest.raises(bhatti.NotFound):
        client.secrets.delete("SDK_SECRET")


def test_errors(client, sb):
    with pytest.raises(bhatti.BadRequest):
        client.create(cpus=0)
    # A create of a name you have returns that sandbox (a retry is safe).
    again = client.create(name=sb.name)
    assert again.id == sb.id and again.existed and not sb.existed
    assert again.info.thermal == "hot" and again.info.labels == {}
    with pytest.raises(bhatti.Unauthorized):
        with Bhatti(token="bht_wrong") as bad:
            bad.list()
    with pytest.raises(bhatti.BhattiConnectionError):
        with Bhatti(url="http://127.0.0.1:9", token="x") as gone:
            gone.list()


def test_exec_buffered(sb):
    r = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
    assert sb.exec("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sb.exec(["printenv", "X"], env={"X": "y"}).stdout == "y\n"
    assert sb.exec(["cat"], stdin=b"fed\x00in").stdout_bytes == b"fed\x00in"
    assert sb.exec(["no-such-program"]).exit_code == 127
    raw = sb.exec(["printf", "\\377\\376ok"])
    assert raw.stdout_bytes == b"\xff\xfeok"
    t0 = time.monotonic()
    r = sb.exec(["sleep", "30"], timeout=1)
    assert r.timed_out and time.monotonic() - t0 < 20


def test_exec_stream_iterator_over_3_seconds(sb):
    script = "for i in 1 2 3 4; do echo tick $i; sleep 1; done; echo bye >&2"
    t0 = time.monotonic()
    seen = []
    for ev in sb.exec_stream(["sh", "-c", script]):
        seen.append((time.monotonic() - t0, ev))
    chunks = [(t, e) for t, e in seen if e.type == "stdout"]
    out = "".join(e.text for _, e in chunks)
    assert out == "tick 1\ntick 2\ntick 3\ntick 4\n"
    # Streamed as it happens: the first line long before the last.
    assert chunks[-1][0] - chunks[0][0] > 2.5, seen
    assert any(e.type == "stderr" and e.text == "bye\n" for _, e in seen)
    assert seen[-1][1].type == "exit" and seen[-1][1].exit_code == 0


def test_exec_stream_callbacks(sb):
    got = []
    r = sb.exec(["sh", "-c", "echo a; sleep 1; echo b; echo c >&2; exit 4"],
                on_stdout=lambda b: got.append(("out", time.monotonic(), b)),
                on_stderr=lambda b: got.append(("err", time.monotonic(), b)))
    assert (r.exit_code, r.stdout, r.stderr) == (4, "a\nb\n", "c\n")
    assert b"".join(b for k, _, b in got if k == "out") == b"a\nb\n"
    assert got[-1][1] - got[0][1] > 0.5, "callbacks ran as output arrived"


def test_exec_stream_break_kills_the_command(sb):
    for ev in sb.exec_stream("echo started; sleep 317"):
        assert ev.type == "stdout" and ev.text == "started\n"
        break
    deadline = time.monotonic() + 15
    while sb.exec(["pgrep", "-f", "sleep 317"]).exit_code == 0:
        assert time.monotonic() < deadline, "the command outlived its stream"
        time.sleep(0.3)


def test_exec_stream_timeout(sb):
    events = list(sb.exec_stream(["sleep", "30"], timeout=1))
    assert events[-1].type == "exit" and events[-1].timed_out


def test_exec_detached(sb):
    d = sb.exec_detached(["sh", "-c", "echo detached-ran"], output_file="/tmp/sdk-detached.log")
    assert d.pid > 0 and d.output_file == "/tmp/sdk-detached.log"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sb.files.read_text(d.output_file) == "detached-ran\n":
            break
        time.sleep(0.2)
    assert sb.files.read_text(d.output_file) == "detached-ran\n"


def test_files_1mib_binary_round_trip(sb):
    data = os.urandom(1 << 20)
    sb.files.write("/workspace/blob.bin", data)
    assert sb.files.read("/workspace/blob.bin") == data
    assert sb.exec(["sha256sum", "/workspace/blob.bin"]).stdout.split()[0] == \
        hashlib.sha256(data).hexdigest()
    st = sb.files.stat("/workspace/blob.bin")
    assert (st.size, st.is_dir) == (1 << 20, False)
    assert sb.files.read("/workspace/blob.bin", max_bytes=10) == data[:10]


def test_files_text_list_stat_and_errors(sb):
    sb.exec(["mkdir", "-p", "/workspace/dir"])
    sb.files.write("/workspace/dir/hello.txt", "héllo\n")
    sb.files.write("/workspace/dir/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert sb.files.read_text("/workspace/dir/hello.txt") == "héllo\n"
    entries = {e.name: e for e in sb.files.list("/workspace/dir")}
    assert entries["hello.txt"].size == len("héllo\n".encode())
    assert entries["run.sh"].mode.endswith("755")
    assert sb.exec(["/workspace/dir/run.sh"]).stdout == "ran\n"
    assert sb.files.stat("/workspace/dir").is_dir
    with pytest.raises(bhatti.NotFound):
        sb.files.read("/workspace/missing")
    with pytest.raises(bhatti.BadRequest):
        sb.files.read("/workspace/dir")
    with pytest.raises(bhatti.BadRequest):
        sb.files.write("/workspace/dir", b"x")


def test_terminal_sessions_detach_reattach(sb):
    with sb.terminal(rows=30, cols=100) as term:
        # Named on open, before any read.
        assert term.session_id is not None
        sid = term.wait_session()
        term.send("echo $((6*7))\n")
        assert b"42\r\n" in term.read_until(b"42\r\n")
        term.resize(33, 111)
        term.send("stty size\n")
        term.read_until(b"33 111")
    deadline = time.monotonic() + 10
    while True:
        s = {x.session_id: x for x in sb.sessions.list()}[sid]
        if not s.attached or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert s.tty and s.running and not s.attached
    with sb.terminal(session=sid) as term:
        assert b"42" in term.read_until(b"42"), "scrollback replayed"
        assert term.wait_session() == sid
    sb.sessions.kill(sid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = {x.session_id: x for x in sb.sessions.list()}.get(sid)
        if s is None or not s.running:
            break
        time.sleep(0.2)
    assert s is None or not s.running
    with pytest.raises(bhatti.NotFound):
        sb.sessions.kill("no-such-session")
    with pytest.raises(bhatti.NotFound):
        sb.terminal(session="no-such-session")


def test_ports_publish_unpublish(sb):
    sb.exec_detached(["python3", "-m", "http.server", "8765", "--directory", "/workspace"],
                     output_file="/tmp/http.log")
    deadline = time.monotonic() + 30
    while 8765 not in [p.port for p in sb.ports()]:
        assert time.monotonic() < deadline, "the server never listened"
        time.sleep(0.3)
    alias = unique("sdkpub")
    pub = sb.publish(8765, alias=alias)
    assert pub.alias == alias and pub.port == 8765 and alias in pub.url
    assert [p.port for p in sb.published()] == [8765]
    with pytest.raises(bhatti.Conflict):
        sb.publish(8765)
    public = os.environ.get("BHATTI_TEST_PUBLIC_ADDR")
    if public:
        sb.files.write("/workspace/index.html", "published!\n")
        host = pub.url.split("://", 1)[1]
        r = httpx.get(f"http://{public}/index.html", headers={"Host": host})
        assert r.status_code == 200 and r.text == "published!\n"
    sb.unpublish(8765)
    assert sb.published() == []
    with pytest.raises(bhatti.NotFound):
        sb.unpublish(8765)


def test_share(client, sb):
    s = sb.share()
    assert s.token.startswith("bsh_")
    assert s.url == f"{client.api_url}/_shell/{sb.id}#token={s.token}"
    sb.revoke_share()


def test_stop_start(sb):
    sb.files.write("/workspace/keep.txt", "kept")
    assert sb.stop().status == "stopped"
    assert sb.start().status == "running"
    assert sb.files.read_text("/workspace/keep.txt") == "kept"
    sb.stop()
    # Any call wakes a stopped sandbox.
    assert sb.exec(["echo", "awake"]).stdout == "awake\n"
    assert sb.refresh().status == "running"
