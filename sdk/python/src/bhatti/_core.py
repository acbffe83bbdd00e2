"""What the sync and asyncio clients share: how each call becomes an HTTP
request, and how answers become models or exceptions. No I/O here."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union
from urllib.parse import quote

import httpx

from . import __version__
from .errors import APIError, error_for
from .models import DetachedExec, ExecResult, FileStat, Share

#: Read timeout added to an exec's own timeout (seconds) for the HTTP answer.
EXEC_GRACE = 30.0
#: The daemon's exec timeout when none is given (seconds).
DEFAULT_EXEC_TIMEOUT = 300

Data = Union[bytes, bytearray, memoryview, str]


def path(*segments: Any) -> str:
    """``/a/b/c`` with each segment percent-encoded."""
    return "/" + "/".join(quote(str(s), safe="") for s in segments)


@dataclass
class Req:
    """One HTTP request, before it is sent."""

    method: str
    path: str
    params: Any = None  # a mapping, or a list of (key, value) pairs for repeated keys
    json: Any = None
    content: Optional[bytes] = None
    headers: Dict[str, str] = field(default_factory=dict)
    #: Read timeout for this request (None: the client's).
    read_timeout: Optional[float] = None


def headers(token: Optional[str]) -> Dict[str, str]:
    h = {"User-Agent": f"bhatti-python/{__version__}"}
    if token:
        h["Authorization"] = f"Bearer {token}"
    return h


def timeout_for(client_timeout: httpx.Timeout, req: Req) -> httpx.Timeout:
    if req.read_timeout is None:
        return client_timeout
    return httpx.Timeout(client_timeout.connect, read=req.read_timeout,
                         write=client_timeout.write, pool=client_timeout.pool)


def check(status: int, body: bytes) -> None:
    """Raises the :class:`APIError` for a non-2xx answer."""
    if 200 <= status < 300:
        return
    try:
        parsed: Any = json.loads(body) if body else None
    except ValueError:
        parsed = body
    raise error_for(status, parsed)


def http_base(api_url: str) -> str:
    """The base URL requests name: ``http://localhost`` over a control socket."""
    return "http://localhost" if api_url.startswith("unix://") else api_url


def ws_url(api_url: str, p: str, query: Optional[Mapping[str, Any]] = None) -> str:
    api_url = http_base(api_url)
    base = "wss://" + api_url[len("https://"):] if api_url.startswith("https://") \
        else "ws://" + api_url[len("http://"):]
    url = base + p
    if query:
        url += "?" + str(httpx.QueryParams({k: v for k, v in query.items() if v is not None}))
    return url


# --- sandboxes

def create_body(name: Optional[str], cpus: Optional[int], memory_mb: Optional[int],
                env: Optional[Mapping[str, str]], init: Optional[str],
                secrets: Optional[Sequence[str]], keep_hot: Optional[bool],
                extra: Mapping[str, Any]) -> Dict[str, Any]:
    body: Dict[str, Any] = dict(extra)
    for k, v in (("name", name), ("cpus", cpus), ("memory_mb", memory_mb), ("init", init),
                 ("keep_hot", keep_hot)):
        if v is not None:
            body[k] = v
    if env is not None:
        body["env"] = dict(env)
    if secrets is not None:
        body["secrets"] = list(secrets)
    return body


# --- exec

def exec_req(sandbox: str, cmd: Union[str, Sequence[str]], env: Optional[Mapping[str, str]],
             cwd: Optional[str], timeout: Optional[float], stdin: Optional[Data],
             stream: bool) -> Req:
    """``cmd`` as a string runs through ``sh -c``."""
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
    body: Dict[str, Any] = {"cmd": argv}
    if env:
        body["env"] = dict(env)
    if cwd:
        body["cwd"] = cwd
    if timeout is not None:
        body["timeout_sec"] = max(1, int(round(timeout)))
    if stdin is not None:
        body["stdin_b64"] = base64.b64encode(as_bytes(stdin)).decode()
    hdrs = {"Accept": "application/x-ndjson"} if stream else {}
    # The command cannot outlive its timeout, so no wait for the answer (or,
    # streamed, for the next event) is longer than that.
    limit = float(timeout if timeout else DEFAULT_EXEC_TIMEOUT)
    return Req("POST", path("sandboxes", sandbox, "exec"), json=body, headers=hdrs,
               read_timeout=limit + EXEC_GRACE)


def detach_req(sandbox: str, cmd: Union[str, Sequence[str]], env: Optional[Mapping[str, str]],
               cwd: Optional[str], output_file: Optional[str]) -> Req:
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
    body: Dict[str, Any] = {"cmd": argv, "detach": True}
    if env:
        body["env"] = dict(env)
    if cwd:
        body["cwd"] = cwd
    if output_file:
        body["output_file"] = output_file
    return Req("POST", path("sandboxes", sandbox, "exec"), json=body)


def detached(d: Dict[str, Any]) -> DetachedExec:
    return DetachedExec(pid=int(d["pid"]), output_file=d["output_file"])


def exec_result(d: Dict[str, Any]) -> ExecResult:
    return ExecResult.from_json(d)


class ResultBuilder:
    """Accumulates streamed events into an :class:`ExecResult`."""

    def __init__(self) -> None:
        self.out: List[bytes] = []
        self.err: List[bytes] = []
        self.result: Optional[ExecResult] = None

    def add(self, ev: Any) -> None:
        if ev.type == "stdout":
            self.out.append(ev.data)
        elif ev.type == "stderr":
            self.err.append(ev.data)
        elif ev.type == "exit":
            self.result = ExecResult(exit_code=ev.exit_code, stdout_bytes=b"".join(self.out),
                                     stderr_bytes=b"".join(self.err), timed_out=ev.timed_out)


# --- files

def as_bytes(data: Data) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    return bytes(data)


def write_req(sandbox: str, file_path: str, data: Data, mode: Optional[Union[int, str]]) -> Req:
    params: Dict[str, Any] = {"path": file_path}
    if mode is not None:
        params["mode"] = format(mode, "04o") if isinstance(mode, int) else str(mode)
    body = as_bytes(data)
    return Req("PUT", path("sandboxes", sandbox, "files"), params=params, content=body,
               headers={"Content-Type": "application/octet-stream"},
               read_timeout=max(60.0, len(body) / (1 << 20)))


def read_req(sandbox: str, file_path: str, max_bytes: Optional[int]) -> Req:
    params: Dict[str, Any] = {"path": file_path}
    if max_bytes is not None:
        params["max_bytes"] = max_bytes
    return Req("GET", path("sandboxes", sandbox, "files"), params=params)


def ls_req(sandbox: str, dir_path: str) -> Req:
    return Req("GET", path("sandboxes", sandbox, "files"), params={"path": dir_path, "ls": "true"})


def stat_req(sandbox: str, file_path: str) -> Req:
    return Req("HEAD", path("sandboxes", sandbox, "files"), params={"path": file_path})


def file_stat(h: httpx.Headers) -> FileStat:
    return FileStat(size=int(h.get("x-file-size", "0")), mode=h.get("x-file-mode", ""),
                    is_dir=h.get("x-file-isdir", "false").lower() == "true")


# --- shares

def share(api_url: str, d: Dict[str, Any]) -> Share:
    return Share(sandbox_id=d["sandbox_id"], token=d["token"], url=api_url + d["path"],
                 created_at=d.get("created_at", ""))


def raise_stream_error(message: str) -> None:
    from .errors import StreamError

    raise StreamError(message or "the exec failed")


__all__ = ["APIError", "Req", "path"]
