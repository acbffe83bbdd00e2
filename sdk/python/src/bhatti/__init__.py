"""Python client for bhatti: self-hosted microVM sandboxes.

>>> from bhatti import Bhatti
>>> with Bhatti() as client:
...     sb = client.create(name="demo")
...     print(sb.exec(["echo", "hi"]).stdout)
...     sb.destroy()

:class:`Bhatti` is the blocking client, :class:`AsyncBhatti` the asyncio
one; both read ``~/.bhatti/config.yaml`` / ``$BHATTI_URL`` /
``$BHATTI_TOKEN`` like the CLI (see :mod:`bhatti.config`). Failed calls
raise the :mod:`bhatti.errors` exception of their HTTP status.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    APIError,
    BadRequest,
    BhattiConnectionError,
    BhattiError,
    ConfigError,
    Conflict,
    InternalError,
    LimitExceeded,
    NoSpace,
    NotFound,
    PermissionDenied,
    RateLimited,
    StreamError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from .models import (  # noqa: E402
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
)
from .client import Bhatti, Sandbox, Terminal  # noqa: E402
from .aio import AsyncBhatti, AsyncSandbox, AsyncTerminal  # noqa: E402

__all__ = [
    "AsyncBhatti", "AsyncSandbox", "AsyncTerminal", "Bhatti", "Sandbox", "Terminal",
    "APIError", "BadRequest", "BhattiConnectionError", "BhattiError", "ConfigError", "Conflict",
    "InternalError", "LimitExceeded", "NoSpace", "NotFound", "PermissionDenied", "RateLimited",
    "StreamError", "TooLarge", "Unauthorized", "Unavailable",
    "DetachedExec", "ExecEvent", "ExecResult", "FileEntry", "FileStat", "Health",
    "ListeningPort", "PublishedPort", "SandboxInfo", "SecretInfo", "SessionInfo", "Share",
]
