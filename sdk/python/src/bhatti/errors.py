"""Exceptions. Every failed API call raises an :class:`APIError` subclass
chosen by the HTTP status, which the daemon derives from its error codes:

======  ===========================  ===========================================
status  exception                    when
======  ===========================  ===========================================
400     :class:`BadRequest`          bad input; also ``invalid``, ``not_a_directory``, ``is_a_directory``
401     :class:`Unauthorized`        no or a wrong API key
403     :class:`PermissionDenied`    the guest refused (``permission_denied``)
404     :class:`NotFound`            no such sandbox, file, session, secret, …
409     :class:`Conflict`            name or alias taken, port published, ``busy``, ``exists``
411     :class:`BadRequest`          (length required)
413     :class:`TooLarge`            a file over 100 MiB, a body too large
422     :class:`LimitExceeded`       over a user limit
429     :class:`RateLimited`         too many requests
500     :class:`InternalError`       the daemon or the guest failed (``internal``)
503     :class:`Unavailable`         the sandbox is not ready or its agent does not answer
507     :class:`NoSpace`             the guest's disk is full (``no_space``)
======  ===========================  ===========================================
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type


class BhattiError(Exception):
    """Base of every exception this package raises."""


class ConfigError(BhattiError):
    """``~/.bhatti/config.yaml`` cannot be read or parsed, or a setting is invalid."""


class BhattiConnectionError(BhattiError):
    """The daemon could not be reached (refused, DNS, TLS, timeout)."""


class StreamError(BhattiError):
    """A streamed exec ended with an ``error`` event instead of an exit code."""


class APIError(BhattiError):
    """The daemon answered with an error status.

    Attributes:
        status: the HTTP status code.
        message: the daemon's ``{"error": "..."}`` text (or the raw body).
    """

    status: int = 0

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class BadRequest(APIError):
    """400 (or 411): the request is invalid; the message names the field."""


class Unauthorized(APIError):
    """401: no API key, or one the daemon does not know."""


class PermissionDenied(APIError):
    """403: the guest refused the operation."""


class NotFound(APIError):
    """404: the sandbox, file, session, secret or share does not exist."""


class Conflict(APIError):
    """409: a name or alias is taken, a port is already published, or the target is busy."""


class TooLarge(APIError):
    """413: a body or file over the daemon's limit."""


class LimitExceeded(APIError):
    """422: the request would exceed one of the user's limits."""


class RateLimited(APIError):
    """429: too many requests; retry later."""


class InternalError(APIError):
    """500: the daemon or the guest agent failed."""


class Unavailable(APIError):
    """503: the sandbox is not running or its agent does not answer."""


class NoSpace(APIError):
    """507: the sandbox's disk is full."""


_BY_STATUS: Dict[int, Type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    411: BadRequest,
    413: TooLarge,
    422: LimitExceeded,
    429: RateLimited,
    500: InternalError,
    503: Unavailable,
    507: NoSpace,
}


def error_for(status: int, body: Any) -> APIError:
    """The exception for an error answer (``body``: parsed JSON or text)."""
    message: Optional[str] = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message = body["error"]
    elif isinstance(body, (bytes, bytearray)):
        message = bytes(body).decode("utf-8", "replace").strip()
    elif body is not None:
        message = str(body).strip()
    cls = _BY_STATUS.get(status, APIError)
    return cls(status, message or f"HTTP {status}")
