"""The blocking client: :class:`Bhatti`, :class:`Sandbox`, :class:`Terminal`."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect, unix_connect

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

Callback = Callable[[bytes], Any]


class Bhatti:
    """A connection to a bhatti daemon.

    Args:
        url: API URL, e.g. ``http://127.0.0.1:8080`` (else config file, ``$BHATTI_URL``, default).
        token: API key ``bht_…`` (else config file, ``$BHATTI_TOKEN``).
        timeout: seconds for ordinary requests (create waits for the VM to boot).

    Raises:
        ConfigError: the config file is broken or the URL is not http(s).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None,
                 timeout: float = 180.0):
        self.settings = resolve(url, token)
        self.api_url = self.settings.api_url
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._socket = socket_path(self.api_url)
        self._http = httpx.Client(base_url=_core.http_base(self.api_url),
                                  headers=_core.headers(self.settings.token), timeout=self._timeout,
                                  transport=httpx.HTTPTransport(uds=self._socket)
                                  if self._socket else None)
        self.secrets = Secrets(self)

    # --- plumbing

    def close(self) -> None:
        """Closes the HTTP connections."""
        self._http.close()

    def __enter__(self) -> "Bhatti":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, req: Req, stream: bool = False) -> httpx.Response:
        request = self._http.build_request(req.method, req.path, params=req.params, json=req.json,
                                           content=req.content, headers=req.headers,
                                           timeout=_core.timeout_for(self._timeout, req))
        try:
            resp = self._http.send(request, stream=stream)
        except httpx.TransportError as e:
            raise BhattiConnectionError(f"cannot reach {self.api_url}: {e}") from e
        if resp.status_code >= 300:
            body = resp.read()
            resp.close()
            _core.check(resp.status_code, body)
        return resp

    def _json(self, req: Req) -> Any:
        return self._send(req).json()

    def _ws(self, p: str, query: Optional[Mapping[str, Any]] = None) -> ClientConnection:
        hdrs = {}
        if self.settings.token:
            hdrs["Authorization"] = f"Bearer {self.settings.token}"
        try:
            uri = _core.ws_url(self.api_url, p, query)
            opts: Dict[str, Any] = dict(additional_headers=hdrs,
                                        open_timeout=self._timeout.connect or 10, max_size=None)
            conn = unix_connect(self._socket, uri, **opts) if self._socket \
                else connect(uri, **opts)
            # Entered as a context manager (websockets >= 17.1 wants that);
            # Terminal.close exits it.
            return conn.__enter__()
        except OSError as e:
            raise BhattiConnectionError(f"cannot reach {self.api_url}: {e}") from e
        except Exception as e:  # an HTTP refusal of the upgrade
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status:
                body = getattr(e.response, "body", b"") or b""  # type: ignore[attr-defined]
                _core.check(status, body)
            raise

    # --- API

    def health(self) -> Health:
        """``GET /health`` (no key needed)."""
        return Health.from_json(self._json(Req("GET", "/health")))

    def create(self, name: Optional[str] = None, *, cpus: Optional[int] = None,
               memory_mb: Optional[int] = None, env: Optional[Mapping[str, str]] = None,
               init: Optional[str] = None, secrets: Optional[Sequence[str]] = None,
               keep_hot: Optional[bool] = None, labels: Optional[Mapping[str, str]] = None,
               **extra: Any) -> "Sandbox":
        """Creates a sandbox and waits until its agent answers.

        Args:
            name: ``[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}``, unique among yours (generated if
                None). When you already have a sandbox of that name it is returned as it
                is (nothing is created) and its ``existed`` is True: a retried create is safe.
            cpus, memory_mb: at most your per-sandbox limits (defaults 1 and 512 MiB).
            env: environment variables of every command.
            init: a script run as the TTY session ``init``.
            secrets: names of your secrets, injected as environment variables.
            keep_hot: never idle it to disk.
            labels: at most 16 ``key: value`` labels (``list(labels=...)`` filters by them).
            extra: further fields the daemon accepts.

        Raises:
            BadRequest: an invalid field, or cpus/memory over your per-sandbox limit.
            RateLimited: over your sandbox quota (429). Unavailable: the VM did not boot.
        """
        if labels is not None:
            extra = {**extra, "labels": dict(labels)}
        body = _core.create_body(name, cpus, memory_mb, env, init, secrets, keep_hot, extra)
        resp = self._send(Req("POST", "/sandboxes", json=body))
        sb = Sandbox(self, SandboxInfo.from_json(resp.json()))
        sb.existed = resp.headers.get("x-bhatti-existed") == "true"
        return sb

    def get(self, sandbox: str) -> "Sandbox":
        """The sandbox with this id or name. Raises NotFound."""
        return Sandbox(self, SandboxInfo.from_json(self._json(Req("GET", path("sandboxes", sandbox)))))

    def list(self, labels: Optional[Mapping[str, str]] = None) -> List["Sandbox"]:
        """Your sandboxes; with ``labels``, only those carrying every pair."""
        params = [("label", f"{k}={v}") for k, v in (labels or {}).items()] or None
        infos = listing(self._json(Req("GET", "/sandboxes", params=params)), SandboxInfo)
        return [Sandbox(self, i) for i in infos]

    def destroy(self, sandbox: str) -> None:
        """Destroys a sandbox: its VM, disk, sessions and published ports. Raises NotFound."""
        self._send(Req("DELETE", path("sandboxes", sandbox)))


class Secrets:
    """Your secrets: encrypted at rest, injected into sandboxes created with ``secrets=[…]``."""

    def __init__(self, client: Bhatti):
        self._c = client

    def set(self, name: str, value: str) -> SecretInfo:
        """Creates or replaces a secret. ``name`` is an env-var name. Raises BadRequest."""
        return SecretInfo.from_json(self._c._json(Req("POST", "/secrets",
                                                      json={"name": name, "value": value})))

    def list(self) -> List[SecretInfo]:
        """Names and timestamps (never values)."""
        return listing(self._c._json(Req("GET", "/secrets")), SecretInfo)

    def delete(self, name: str) -> None:
        """Deletes a secret. Raises NotFound."""
        self._c._send(Req("DELETE", path("secrets", name)))


class Sandbox:
    """One sandbox. ``info`` is its state as last fetched (:meth:`refresh`)."""

    def __init__(self, client: Bhatti, info: SandboxInfo):
        self._c = client
        self.info = info
        self.files = Files(self)
        self.sessions = Sessions(self)
        #: True when :meth:`Bhatti.create` found this sandbox already there.
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
        return f"Sandbox(id={self.id!r}, name={self.name!r}, status={self.status!r})"

    def refresh(self) -> "Sandbox":
        """Fetches the sandbox again."""
        self.info = SandboxInfo.from_json(self._c._json(Req("GET", path("sandboxes", self.id))))
        return self

    def update(self, *, name: Optional[str] = None, keep_hot: Optional[bool] = None,
               **extra: Any) -> "Sandbox":
        """Renames it or changes ``keep_hot``. Raises Conflict when the name is taken."""
        body: Dict[str, Any] = dict(extra)
        if name is not None:
            body["name"] = name
        if keep_hot is not None:
            body["keep_hot"] = keep_hot
        self.info = SandboxInfo.from_json(
            self._c._json(Req("PATCH", path("sandboxes", self.id), json=body)))
        return self

    def stop(self) -> "Sandbox":
        """Saves the VM to disk and frees its memory (any later call wakes it)."""
        self.info = SandboxInfo.from_json(self._c._json(Req("POST", path("sandboxes", self.id, "stop"))))
        return self

    def start(self) -> "Sandbox":
        """Restores a stopped sandbox."""
        self.info = SandboxInfo.from_json(self._c._json(Req("POST", path("sandboxes", self.id, "start"))))
        return self

    def destroy(self) -> None:
        """Destroys the sandbox."""
        self._c.destroy(self.id)

    # --- exec

    def exec(self, cmd: Union[str, Sequence[str]], *, env: Optional[Mapping[str, str]] = None,
             cwd: Optional[str] = None, timeout: Optional[float] = None,
             stdin: Optional[Data] = None, on_stdout: Optional[Callback] = None,
             on_stderr: Optional[Callback] = None) -> ExecResult:
        """Runs a command and waits for it.

        Args:
            cmd: argv list, or a string run by ``sh -c``.
            env, cwd: its environment additions and working directory.
            timeout: seconds before its process group is killed (daemon default 300,
                at most 86400); then ``timed_out`` is set.
            stdin: bytes or text fed to its stdin.
            on_stdout, on_stderr: called with each chunk of output as it arrives
                (the exec is streamed then); the result still holds all of it.

        Returns:
            :class:`ExecResult`; a missing program is exit code 127.

        Raises:
            NotFound: no such sandbox. BadRequest: e.g. a relative ``cwd``.
            StreamError: a streamed exec failed before an exit code.
        """
        if on_stdout is None and on_stderr is None:
            req = _core.exec_req(self.id, cmd, env, cwd, timeout, stdin, stream=False)
            return ExecResult.from_json(self._c._json(req))
        builder = _core.ResultBuilder()
        for ev in self.exec_stream(cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin):
            if ev.type == "stdout" and on_stdout:
                on_stdout(ev.data)
            elif ev.type == "stderr" and on_stderr:
                on_stderr(ev.data)
            builder.add(ev)
        assert builder.result is not None  # exec_stream ends with exit or raises
        return builder.result

    def exec_stream(self, cmd: Union[str, Sequence[str]], *,
                    env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                    timeout: Optional[float] = None,
                    stdin: Optional[Data] = None) -> Iterator[ExecEvent]:
        """Runs a command and yields its :class:`ExecEvent`\\ s as they happen:
        ``stdout``/``stderr`` chunks, then one ``exit``. Closing the iterator
        early (``break``) kills the command.

        Raises:
            StreamError: the daemon sent an ``error`` event. Other errors as :meth:`exec`.
        """
        req = _core.exec_req(self.id, cmd, env, cwd, timeout, stdin, stream=True)
        resp = self._c._send(req, stream=True)
        try:
            for line in resp.iter_lines():
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
            resp.close()
        raise StreamError("the exec stream ended without an exit code")

    def exec_detached(self, cmd: Union[str, Sequence[str]], *,
                      env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                      output_file: Optional[str] = None) -> DetachedExec:
        """Starts a command in a session of its own and returns at once; its
        output goes to ``output_file`` (absolute; default ``/tmp/bhatti-exec-<random>.log``).
        No timeout applies."""
        return _core.detached(self._c._json(_core.detach_req(self.id, cmd, env, cwd, output_file)))

    # --- terminal, ports, publish, share

    def terminal(self, *, rows: int = 24, cols: int = 80,
                 session: Optional[str] = None) -> "Terminal":
        """Opens an interactive PTY: the same TTY sessions as ``bhatti shell``.

        Without ``session`` it reattaches to your newest detached login shell,
        else starts one. Closing the terminal detaches; the shell keeps
        running with its scrollback. Raises NotFound for an unknown session.
        """
        query = {"rows": rows, "cols": cols, "session": session}
        t = Terminal(self._c._ws(path("sandboxes", self.id, "ws"), query))
        try:
            # The server names the session first: session_id is set on return.
            t.wait_session()
        except BaseException:
            t.close()
            raise
        return t

    def ports(self) -> List[ListeningPort]:
        """TCP ports listening inside the sandbox."""
        return listing(self._c._json(Req("GET", path("sandboxes", self.id, "ports"))), ListeningPort)

    def publish(self, port: int, alias: Optional[str] = None) -> PublishedPort:
        """Publishes ``port`` at a public URL (no key needed to use it).

        Raises:
            Conflict: the alias is taken or the port already published.
            BadRequest: a bad port or alias.
        """
        body: Dict[str, Any] = {"port": port}
        if alias is not None:
            body["alias"] = alias
        return PublishedPort.from_json(
            self._c._json(Req("POST", path("sandboxes", self.id, "publish"), json=body)))

    def published(self) -> List[PublishedPort]:
        """The sandbox's published ports."""
        return listing(self._c._json(Req("GET", path("sandboxes", self.id, "publish"))),
                       PublishedPort)

    def unpublish(self, port: int) -> None:
        """Removes a published port; its URL stops working at once. Raises NotFound."""
        self._c._send(Req("DELETE", path("sandboxes", self.id, "publish", port)))

    def share(self) -> Share:
        """Mints a web terminal link (replacing and disconnecting any earlier one)."""
        d = self._c._json(Req("POST", path("sandboxes", self.id, "share"), json={}))
        return _core.share(self._c.api_url, d)

    def revoke_share(self) -> None:
        """Ends the web terminal link and closes the open web terminals."""
        self._c._send(Req("DELETE", path("sandboxes", self.id, "share")))


class Files:
    """Files of a sandbox. Paths are absolute or relative to ``/workspace``."""

    def __init__(self, sandbox: Sandbox):
        self._s = sandbox

    def write(self, file_path: str, data: Data, *, mode: Optional[Union[int, str]] = None) -> None:
        """Writes a file atomically (bytes, or text as UTF-8), at most 100 MiB.

        Args:
            mode: e.g. ``0o755`` or ``"0755"``.

        Raises:
            TooLarge: over 100 MiB. NotFound: the directory does not exist.
            BadRequest: the path is a directory. NoSpace: the disk is full.
        """
        self._s._c._send(_core.write_req(self._s.id, file_path, data, mode))

    def read(self, file_path: str, *, max_bytes: Optional[int] = None) -> bytes:
        """The file's bytes (the first ``max_bytes`` if given).

        Raises: NotFound; BadRequest for a directory; PermissionDenied.
        """
        return self._s._c._send(_core.read_req(self._s.id, file_path, max_bytes)).content

    def read_text(self, file_path: str, encoding: str = "utf-8") -> str:
        """The file decoded as text."""
        return self.read(file_path).decode(encoding)

    def list(self, dir_path: str = "/workspace") -> List[FileEntry]:
        """The directory's entries (at most 10,000). Raises NotFound, BadRequest for a file."""
        return listing(self._s._c._json(_core.ls_req(self._s.id, dir_path)), FileEntry)

    def stat(self, file_path: str) -> FileStat:
        """Size, mode and whether it is a directory. Raises NotFound."""
        return _core.file_stat(self._s._c._send(_core.stat_req(self._s.id, file_path)).headers)


class Sessions:
    """Sessions of a sandbox: shells, the init script, detached commands."""

    def __init__(self, sandbox: Sandbox):
        self._s = sandbox

    def list(self) -> List[SessionInfo]:
        return listing(self._s._c._json(Req("GET", path("sandboxes", self._s.id, "sessions"))),
                       SessionInfo)

    def kill(self, session_id: str) -> None:
        """Kills the session's process group. Raises NotFound."""
        self._s._c._send(Req("DELETE", path("sandboxes", self._s.id, "sessions", session_id)))


class Terminal:
    """An interactive PTY over the shell WebSocket (see :meth:`Sandbox.terminal`).

    ``session_id`` names the TTY session; :meth:`read` returns output bytes;
    :meth:`close` detaches (the shell keeps running).
    """

    def __init__(self, ws: ClientConnection):
        self._ws = ws
        self.session_id: Optional[str] = None
        self.exit_code: Optional[int] = None
        self.closed = False
        self._pending = bytearray()

    def __enter__(self) -> "Terminal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, data: Data) -> None:
        """Types ``data`` (text as UTF-8) into the terminal."""
        self._ws.send(_core.as_bytes(data))

    def resize(self, rows: int, cols: int) -> None:
        """Sets the window size."""
        self._ws.send(json.dumps({"type": "resize", "rows": rows, "cols": cols}))

    def read(self, timeout: Optional[float] = None) -> bytes:
        """The next output bytes; ``b""`` on timeout or once the shell has ended."""
        if self._pending:
            out = bytes(self._pending)
            self._pending.clear()
            return out
        return self._recv(timeout)

    def _recv(self, timeout: Optional[float]) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = self._ws.recv(timeout=left)
            except TimeoutError:
                return b""
            except ConnectionClosed:
                self.closed = True
                return b""
            if isinstance(msg, bytes):
                return msg
            self._control(msg)
        return b""

    def read_until(self, marker: Data, timeout: float = 30.0) -> bytes:
        """Reads until ``marker`` appears; returns everything read (marker included).

        Raises:
            TimeoutError: not seen within ``timeout`` seconds (what was read is in ``args[1]``).
        """
        want = _core.as_bytes(marker)
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while want not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise TimeoutError(f"{want!r} not seen", bytes(buf))
            buf += self.read(timeout=left)
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

    def wait_session(self, timeout: float = 10.0) -> str:
        """Waits for the server to name the session; returns its id."""
        deadline = time.monotonic() + timeout
        while self.session_id is None and time.monotonic() < deadline and not self.closed:
            self._pending += self._recv(max(0.0, deadline - time.monotonic()))
        if self.session_id is None:
            raise TimeoutError("the server did not name the session")
        return self.session_id

    def close(self) -> None:
        """Detaches: the session keeps running with its scrollback."""
        self.closed = True
        self._ws.__exit__(None, None, None)
