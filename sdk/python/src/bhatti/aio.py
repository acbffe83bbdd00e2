"""The asyncio client: :class:`AsyncBhatti`, :class:`AsyncSandbox`,
:class:`AsyncTerminal`. Same methods, shapes and exceptions as the
blocking client in :mod:`bhatti.client`, as coroutines."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from typing import (Any, AsyncIterator, Awaitable, Callable, Dict, List, Mapping, Optional,
                    Sequence, Union)

import httpx
from websockets.asyncio.client import ClientConnection, connect, unix_connect
from websockets.exceptions import ConnectionClosed

from . import _core
from ._core import Data, Req, path
from .config import resolve, socket_path
from .errors import BhattiConnectionError, StreamError
from .models import (
    DetachedExec,
    ExecEvent,
    ExecResult,
    FileEntry,
    FileStat,
    Health,
    ListeningPort,
    PublishedPort,
    SandboxInfo,
    SecretInfo,
    SessionInfo,
    Share,
    listing,
)

#: Output callback: a plain function or a coroutine function.
AsyncCallback = Callable[[bytes], Union[Any, Awaitable[Any]]]


class AsyncBhatti:
    """An asyncio connection to a bhatti daemon; arguments and errors as :class:`bhatti.Bhatti`.

    Use ``async with AsyncBhatti() as client:``, or ``await client.close()``.
    """

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None,
                 timeout: float = 180.0):
        self.settings = resolve(url, token)
        self.api_url = self.settings.api_url
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._socket = socket_path(self.api_url)
        self._http = httpx.AsyncClient(base_url=_core.http_base(self.api_url),
                                       headers=_core.headers(self.settings.token),
                                       timeout=self._timeout,
                                       transport=httpx.AsyncHTTPTransport(uds=self._socket)
                                       if self._socket else None)
        self.secrets = AsyncSecrets(self)

    async def close(self) -> None:
        """Closes the HTTP connections."""
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncBhatti":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _send(self, req: Req, stream: bool = False) -> httpx.Response:
        request = self._http.build_request(req.method, req.path, params=req.params, json=req.json,
                                           content=req.content, headers=req.headers,
                                           timeout=_core.timeout_for(self._timeout, req))
        try:
            resp = await self._http.send(request, stream=stream)
        except httpx.TransportError as e:
            raise BhattiConnectionError(f"cannot reach {self.api_url}: {e}") from e
        if resp.status_code >= 300:
            body = await resp.aread()
            await resp.aclose()
            _core.check(resp.status_code, body)
        return resp

    async def _json(self, req: Req) -> Any:
        return (await self._send(req)).json()

    async def _ws(self, p: str, query: Optional[Mapping[str, Any]] = None) -> ClientConnection:
        hdrs = {}
        if self.settings.token:
            hdrs["Authorization"] = f"Bearer {self.settings.token}"
        try:
            uri = _core.ws_url(self.api_url, p, query)
            opts: Dict[str, Any] = dict(additional_headers=hdrs,
                                        open_timeout=self._timeout.connect or 10, max_size=None)
            if self._socket:
                return await unix_connect(self._socket, uri, **opts)
            return await connect(uri, **opts)
        except OSError as e:
            raise BhattiConnectionError(f"cannot reach {self.api_url}: {e}") from e
        except Exception as e:  # an HTTP refusal of the upgrade
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status:
                body = getattr(e.response, "body", b"") or b""  # type: ignore[attr-defined]
                _core.check(status, body)
            raise

    async def health(self) -> Health:
        """``GET /health`` (no key needed)."""
        return Health.from_json(await self._json(Req("GET", "/health")))

    async def create(self, name: Optional[str] = None, *, cpus: Optional[int] = None,
                     memory_mb: Optional[int] = None, env: Optional[Mapping[str, str]] = None,
                     init: Optional[str] = None, secrets: Optional[Sequence[str]] = None,
                     keep_hot: Optional[bool] = None, labels: Optional[Mapping[str, str]] = None,
                     **extra: Any) -> "AsyncSandbox":
        """Creates a sandbox and waits until its agent answers (see :meth:`bhatti.Bhatti.create`)."""
        if labels is not None:
            extra = {**extra, "labels": dict(labels)}
        body = _core.create_body(name, cpus, memory_mb, env, init, secrets, keep_hot, extra)
        resp = await self._send(Req("POST", "/sandboxes", json=body))
        sb = AsyncSandbox(self, SandboxInfo.from_json(resp.json()))
        sb.existed = resp.headers.get("x-bhatti-existed") == "true"
        return sb

    async def get(self, sandbox: str) -> "AsyncSandbox":
        """The sandbox with this id or name. Raises NotFound."""
        info = SandboxInfo.from_json(await self._json(Req("GET", path("sandboxes", sandbox))))
        return AsyncSandbox(self, info)

    async def list(self) -> List["AsyncSandbox"]:
        """All your sandboxes."""
        infos = listing(await self._json(Req("GET", "/sandboxes")), SandboxInfo)
        return [AsyncSandbox(self, i) for i in infos]

    async def destroy(self, sandbox: str) -> None:
        """Destroys a sandbox. Raises NotFound."""
        await self._send(Req("DELETE", path("sandboxes", sandbox)))


class AsyncSecrets:
    """Your secrets (see :class:`bhatti.client.Secrets`)."""

    def __init__(self, client: AsyncBhatti):
        self._c = client

    async def set(self, name: str, value: str) -> SecretInfo:
        return SecretInfo.from_json(await self._c._json(
            Req("POST", "/secrets", json={"name": name, "value": value})))

    async def list(self) -> List[SecretInfo]:
        return listing(await self._c._json(Req("GET", "/secrets")), SecretInfo)

    async def delete(self, name: str) -> None:
        await self._c._send(Req("DELETE", path("secrets", name)))


async def _call(cb: Optional[AsyncCallback], data: bytes) -> None:
    if cb is None:
        return
    r = cb(data)
    if inspect.isawaitable(r):
        await r


class AsyncSandbox:
    """One sandbox (see :class:`bhatti.Sandbox`); every call is a coroutine."""

    def __init__(self, client: AsyncBhatti, info: SandboxInfo):
        self._c = client
        self.info = info
        self.files = AsyncFiles(self)
        self.sessions = AsyncSessions(self)
        #: True when :meth:`AsyncBhatti.create` found this sandbox already there.
        self.existed = False

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def status(self) -> str:
        return self.info.status

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, name={self.name!r}, status={self.status!r})"

    async def _info(self, req: Req) -> "AsyncSandbox":
        self.info = SandboxInfo.from_json(await self._c._json(req))
        return self

    async def refresh(self) -> "AsyncSandbox":
        return await self._info(Req("GET", path("sandboxes", self.id)))

    async def update(self, *, name: Optional[str] = None, keep_hot: Optional[bool] = None,
                     **extra: Any) -> "AsyncSandbox":
        body: Dict[str, Any] = dict(extra)
        if name is not None:
            body["name"] = name
        if keep_hot is not None:
            body["keep_hot"] = keep_hot
        return await self._info(Req("PATCH", path("sandboxes", self.id), json=body))

    async def stop(self) -> "AsyncSandbox":
        return await self._info(Req("POST", path("sandboxes", self.id, "stop")))

    async def start(self) -> "AsyncSandbox":
        return await self._info(Req("POST", path("sandboxes", self.id, "start")))

    async def destroy(self) -> None:
        await self._c.destroy(self.id)

    async def exec(self, cmd: Union[str, Sequence[str]], *,
                   env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                   timeout: Optional[float] = None, stdin: Optional[Data] = None,
                   on_stdout: Optional[AsyncCallback] = None,
                   on_stderr: Optional[AsyncCallback] = None) -> ExecResult:
        """Runs a command and waits for it (see :meth:`bhatti.Sandbox.exec`); callbacks
        may be plain or coroutine functions."""
        if on_stdout is None and on_stderr is None:
            req = _core.exec_req(self.id, cmd, env, cwd, timeout, stdin, stream=False)
            return ExecResult.from_json(await self._c._json(req))
        builder = _core.ResultBuilder()
        async for ev in self.exec_stream(cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin):
            if ev.type == "stdout":
                await _call(on_stdout, ev.data)
            elif ev.type == "stderr":
                await _call(on_stderr, ev.data)
            builder.add(ev)
        assert builder.result is not None
        return builder.result

    async def exec_stream(self, cmd: Union[str, Sequence[str]], *,
                          env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                          timeout: Optional[float] = None,
                          stdin: Optional[Data] = None) -> AsyncIterator[ExecEvent]:
        """Yields the command's :class:`ExecEvent`\\ s as they happen (see
        :meth:`bhatti.Sandbox.exec_stream`)."""
        req = _core.exec_req(self.id, cmd, env, cwd, timeout, stdin, stream=True)
        resp = await self._c._send(req, stream=True)
        try:
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                ev = ExecEvent.from_json(json.loads(line))
                if ev.type == "error":
                    _core.raise_stream_error(ev.message)
                yield ev
                if ev.type == "exit":
                    return
        except httpx.TransportError as e:
            raise BhattiConnectionError(f"exec stream broken: {e}") from e
        finally:
            await resp.aclose()
        raise StreamError("the exec stream ended without an exit code")

    async def exec_detached(self, cmd: Union[str, Sequence[str]], *,
                            env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                            output_file: Optional[str] = None) -> DetachedExec:
        return _core.detached(await self._c._json(
            _core.detach_req(self.id, cmd, env, cwd, output_file)))

    async def terminal(self, *, rows: int = 24, cols: int = 80,
                       session: Optional[str] = None) -> "AsyncTerminal":
        """Opens an interactive PTY (see :meth:`bhatti.Sandbox.terminal`);
        use ``async with await sb.terminal() as term``."""
        query = {"rows": rows, "cols": cols, "session": session}
        t = AsyncTerminal(await self._c._ws(path("sandboxes", self.id, "ws"), query))
        try:
            # The server names the session first: session_id is set on return.
            await t.wait_session()
        except BaseException:
            await t.close()
            raise
        return t

    async def ports(self) -> List[ListeningPort]:
        return listing(await self._c._json(Req("GET", path("sandboxes", self.id, "ports"))),
                       ListeningPort)

    async def publish(self, port: int, alias: Optional[str] = None) -> PublishedPort:
        body: Dict[str, Any] = {"port": port}
        if alias is not None:
            body["alias"] = alias
        return PublishedPort.from_json(await self._c._json(
            Req("POST", path("sandboxes", self.id, "publish"), json=body)))

    async def published(self) -> List[PublishedPort]:
        return listing(await self._c._json(Req("GET", path("sandboxes", self.id, "publish"))),
                       PublishedPort)

    async def unpublish(self, port: int) -> None:
        await self._c._send(Req("DELETE", path("sandboxes", self.id, "publish", port)))

    async def share(self) -> Share:
        d = await self._c._json(Req("POST", path("sandboxes", self.id, "share"), json={}))
        return _core.share(self._c.api_url, d)

    async def revoke_share(self) -> None:
        await self._c._send(Req("DELETE", path("sandboxes", self.id, "share")))


class AsyncFiles:
    """Files of a sandbox (see :class:`bhatti.client.Files`)."""

    def __init__(self, sandbox: AsyncSandbox):
        self._s = sandbox

    async def write(self, file_path: str, data: Data, *,
                    mode: Optional[Union[int, str]] = None) -> None:
        await self._s._c._send(_core.write_req(self._s.id, file_path, data, mode))

    async def read(self, file_path: str, *, max_bytes: Optional[int] = None) -> bytes:
        return (await self._s._c._send(_core.read_req(self._s.id, file_path, max_bytes))).content

    async def read_text(self, file_path: str, encoding: str = "utf-8") -> str:
        return (await self.read(file_path)).decode(encoding)

    async def list(self, dir_path: str = "/workspace") -> List[FileEntry]:
        return listing(await self._s._c._json(_core.ls_req(self._s.id, dir_path)), FileEntry)

    async def stat(self, file_path: str) -> FileStat:
        resp = await self._s._c._send(_core.stat_req(self._s.id, file_path))
        return _core.file_stat(resp.headers)


class AsyncSessions:
    """Sessions of a sandbox (see :class:`bhatti.client.Sessions`)."""

    def __init__(self, sandbox: AsyncSandbox):
        self._s = sandbox

    async def list(self) -> List[SessionInfo]:
        return listing(await self._s._c._json(
            Req("GET", path("sandboxes", self._s.id, "sessions"))), SessionInfo)

    async def kill(self, session_id: str) -> None:
        await self._s._c._send(Req("DELETE", path("sandboxes", self._s.id, "sessions", session_id)))


class AsyncTerminal:
    """An interactive PTY (see :class:`bhatti.Terminal`)."""

    def __init__(self, ws: ClientConnection):
        self._ws = ws
        self.session_id: Optional[str] = None
        self.exit_code: Optional[int] = None
        self.closed = False
        self._pending = bytearray()

    async def __aenter__(self) -> "AsyncTerminal":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def send(self, data: Data) -> None:
        await self._ws.send(_core.as_bytes(data))

    async def resize(self, rows: int, cols: int) -> None:
        await self._ws.send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    async def read(self, timeout: Optional[float] = None) -> bytes:
        """The next output bytes; ``b""`` on timeout or once the shell has ended."""
        if self._pending:
            out = bytes(self._pending)
            self._pending.clear()
            return out
        return await self._recv(timeout)

    async def _recv(self, timeout: Optional[float]) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = await asyncio.wait_for(self._ws.recv(), left)
            except asyncio.TimeoutError:
                return b""
            except ConnectionClosed:
                self.closed = True
                return b""
            if isinstance(msg, bytes):
                return msg
            self._control(msg)
        return b""

    async def read_until(self, marker: Data, timeout: float = 30.0) -> bytes:
        """Reads until ``marker`` appears. Raises TimeoutError (what was read in ``args[1]``)."""
        want = _core.as_bytes(marker)
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while want not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise TimeoutError(f"{want!r} not seen", bytes(buf))
            buf += await self.read(timeout=left)
        return bytes(buf)

    def _control(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            return
        if msg.get("type") == "session":
            self.session_id = msg.get("session_id")
        elif msg.get("type") == "exit":
            self.exit_code = msg.get("exit_code")

    async def wait_session(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while self.session_id is None and time.monotonic() < deadline and not self.closed:
            self._pending += await self._recv(max(0.0, deadline - time.monotonic()))
        if self.session_id is None:
            raise TimeoutError("the server did not name the session")
        return self.session_id

    async def close(self) -> None:
        """Detaches: the session keeps running with its scrollback."""
        self.closed = True
        await self._ws.close()
