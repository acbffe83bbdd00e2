"""Typed answers of the API (dataclasses). Each keeps the JSON it came
from in ``raw``, so fields a newer daemon adds are not lost."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


def _field(d: Dict[str, Any], key: str, default: Any = None) -> Any:
    v = d.get(key, default)
    return default if v is None else v


@dataclass
class SandboxInfo:
    """A sandbox as ``GET /sandboxes/{id}`` shows it.

    ``status`` is ``"creating"``, ``"running"``, ``"stopped"``, … ;
    ``created_at`` is RFC 3339; ``memory_mb`` in MiB.
    """

    id: str
    name: str
    status: str
    ip: str
    cpus: int
    memory_mb: int
    keep_hot: bool
    created_at: str
    #: The owner's ``key: value`` labels.
    labels: Dict[str, str] = field(default_factory=dict)
    #: ``"hot"``, ``"warm"`` (paused) or ``"cold"`` (saved to disk); None while
    #: creating or after an error. Reading it never wakes the sandbox.
    thermal: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "SandboxInfo":
        return cls(id=d["id"], name=d["name"], status=d["status"], ip=_field(d, "ip", ""),
                   cpus=int(_field(d, "cpus", 0)), memory_mb=int(_field(d, "memory_mb", 0)),
                   keep_hot=bool(_field(d, "keep_hot", False)),
                   created_at=_field(d, "created_at", ""),
                   labels=dict(_field(d, "labels", {}) or {}), thermal=d.get("thermal"), raw=d)


def _stream_bytes(d: Dict[str, Any], name: str) -> bytes:
    b64 = d.get(f"{name}_b64")
    if b64:
        return base64.b64decode(b64)
    return (d.get(name) or "").encode()


@dataclass
class ExecResult:
    """A finished command.

    ``stdout``/``stderr`` are text (UTF-8, undecodable bytes replaced);
    ``stdout_bytes``/``stderr_bytes`` are exact. ``timed_out``: the timeout
    killed it. ``truncated``: buffered output past 16 MiB per stream was
    dropped (stream the exec to get all of it).
    """

    exit_code: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    timed_out: bool = False
    truncated: bool = False

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """The command exited 0."""
        return self.exit_code == 0

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ExecResult":
        return cls(exit_code=int(d["exit_code"]), stdout_bytes=_stream_bytes(d, "stdout"),
                   stderr_bytes=_stream_bytes(d, "stderr"),
                   timed_out=bool(d.get("timed_out", False)),
                   truncated=bool(d.get("truncated", False)))


@dataclass
class ExecEvent:
    """One event of a streamed exec.

    ``type`` is ``"stdout"``, ``"stderr"``, ``"exit"`` or ``"error"``.
    ``data`` holds the output bytes (stdout/stderr), ``exit_code`` and
    ``timed_out`` the end (exit), ``message`` the failure (error).
    """

    type: str
    data: bytes = b""
    exit_code: Optional[int] = None
    timed_out: bool = False
    message: str = ""

    @property
    def text(self) -> str:
        """``data`` as text (undecodable bytes replaced)."""
        return self.data.decode("utf-8", "replace")

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ExecEvent":
        t = d.get("type", "")
        if t in ("stdout", "stderr"):
            return cls(type=t, data=_stream_bytes(d, "data"))
        if t == "exit":
            return cls(type=t, exit_code=int(d.get("exit_code", -1)),
                       timed_out=bool(d.get("timed_out", False)))
        return cls(type=t or "error", message=d.get("message") or d.get("data") or "")


@dataclass
class DetachedExec:
    """A command started with ``detach=True``: its pid in the sandbox and
    the file its stdout and stderr go to."""

    pid: int
    output_file: str


@dataclass
class FileEntry:
    """An entry of a directory listing. ``mode`` like ``"0644"``; ``mtime`` in Unix seconds."""

    name: str
    size: int
    mode: str
    is_dir: bool
    mtime: int

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "FileEntry":
        return cls(name=d["name"], size=int(d["size"]), mode=str(d["mode"]),
                   is_dir=bool(d["is_dir"]), mtime=int(d.get("mtime", 0)))


@dataclass
class FileStat:
    """What ``HEAD /files`` tells: size in bytes, mode like ``"0644"``, whether a directory."""

    size: int
    mode: str
    is_dir: bool


@dataclass
class SessionInfo:
    """A session (shell, init script, detached exec) inside a sandbox.

    ``argv`` is the command line as one string; ``created_at`` Unix seconds.
    """

    session_id: str
    argv: str
    tty: bool
    running: bool
    exit_code: Optional[int]
    attached: bool
    created_at: int

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "SessionInfo":
        return cls(session_id=d["session_id"], argv=d.get("argv", ""), tty=bool(d.get("tty")),
                   running=bool(d.get("running")), exit_code=d.get("exit_code"),
                   attached=bool(d.get("attached")), created_at=int(d.get("created_at", 0)))


@dataclass
class SecretInfo:
    """A secret's name and timestamps (RFC 3339); values are never returned."""

    name: str
    created_at: str
    updated_at: str

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "SecretInfo":
        return cls(name=d["name"], created_at=d.get("created_at", ""),
                   updated_at=d.get("updated_at", ""))


@dataclass
class PublishedPort:
    """A port published at ``url`` (``<scheme>://<alias>.<domain>``), reachable without a key."""

    id: int
    sandbox_id: str
    port: int
    alias: str
    url: str
    created_at: str

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "PublishedPort":
        return cls(id=int(d["id"]), sandbox_id=d["sandbox_id"], port=int(d["port"]),
                   alias=d["alias"], url=d["url"], created_at=d.get("created_at", ""))


@dataclass
class ListeningPort:
    """A TCP port listening inside the sandbox; ``proxy_url`` reaches it through the
    authenticated proxy."""

    port: int
    address: str
    proxy_url: Optional[str] = None

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ListeningPort":
        return cls(port=int(d["port"]), address=d.get("address", ""),
                   proxy_url=d.get("proxy_url"))


@dataclass
class Share:
    """A web terminal link (``bhatti share``): ``url`` opens the sandbox's
    terminal in a browser for whoever holds it, until revoked or replaced."""

    sandbox_id: str
    token: str
    url: str
    created_at: str


@dataclass
class Health:
    """``GET /health``: ``status`` is ``"ok"``; ``uptime`` like ``"2h15m30s"``."""

    status: str
    sandboxes: int
    uptime: str
    version: str = ""

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Health":
        return cls(status=d["status"], sandboxes=int(d.get("sandboxes", 0)),
                   uptime=d.get("uptime", ""), version=d.get("version", ""))


def listing(items: List[Dict[str, Any]], cls: Any) -> List[Any]:
    """Parses a JSON array into models of ``cls``."""
    return [cls.from_json(i) for i in items]
