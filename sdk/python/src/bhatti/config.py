"""Where the client connects, resolved like the ``bhatti`` CLI does:

``argument > ~/.bhatti/config.yaml > $BHATTI_URL / $BHATTI_TOKEN > default``

The config file holds ``api_url`` and ``auth_token`` (``bhatti setup``
writes it). The default URL is ``http://127.0.0.1:8080``; there is no
default token.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .errors import ConfigError

DEFAULT_API_URL = "http://127.0.0.1:8080"
URL_ENV = "BHATTI_URL"
#: Names the daemon's control socket tried when no URL is configured.
SOCKET_ENV = "BHATTI_SOCKET"
#: The control socket of a daemon with the default data dir.
DEFAULT_SOCKET_PATH = "/var/lib/bhatti/api.sock"
TOKEN_ENV = "BHATTI_TOKEN"


@dataclass(frozen=True)
class Settings:
    """The resolved endpoint and key, and where each came from
    (``"argument"``, ``"config"``, ``"env"`` or ``"default"``)."""

    api_url: str
    token: Optional[str]
    api_url_source: str
    token_source: Optional[str]


def config_path() -> Optional[Path]:
    """``$HOME/.bhatti/config.yaml``, or None without a home directory."""
    home = os.environ.get("HOME")
    return Path(home) / ".bhatti" / "config.yaml" if home else None


def load_config(path: Optional[Path] = None) -> dict:
    """The config file as a dict (empty when it does not exist).

    Raises:
        ConfigError: the file cannot be read, is not YAML, or has unknown keys.
    """
    path = path or config_path()
    if path is None or not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with api_url and auth_token")
    unknown = set(data) - {"api_url", "auth_token"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    return data


def _usable_socket(p: str) -> bool:
    """A socket this process may connect to (root's 0600 socket is not for
    other users, who keep the TCP default)."""
    try:
        st = os.stat(p)
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and os.access(p, os.W_OK)


def socket_path(api_url: str) -> Optional[str]:
    """The control socket a ``unix:///path`` URL names, else None."""
    return api_url[len("unix://"):] if api_url.startswith("unix://") else None


def resolve(url: Optional[str] = None, token: Optional[str] = None,
            config_file: Optional[Path] = None) -> Settings:
    """Resolves the API URL and key (see the module docstring).

    Raises:
        ConfigError: the config file is broken, or the URL is not http(s).
    """
    cfg = load_config(config_file)
    candidates = [
        (url, "argument"),
        (cfg.get("api_url"), "config"),
        (os.environ.get(URL_ENV), "env"),
    ]
    sock = os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH
    default = f"unix://{sock}" if _usable_socket(sock) else DEFAULT_API_URL
    api_url, url_src = next(((v, s) for v, s in candidates if v), (default, "default"))
    api_url = str(api_url).rstrip("/")
    if api_url.startswith("unix://"):
        if not api_url[len("unix://"):].startswith("/"):
            raise ConfigError(f"API URL {api_url!r}: a control socket is unix:// and an "
                              "absolute path, like unix:///var/lib/bhatti/api.sock")
    elif not api_url.startswith(("http://", "https://")):
        raise ConfigError(f"API URL {api_url!r} must start with http://, https:// or unix://")
    tok_candidates = [
        (token, "argument"),
        (cfg.get("auth_token"), "config"),
        (os.environ.get(TOKEN_ENV), "env"),
    ]
    found = next(((v, s) for v, s in tok_candidates if v), (None, None))
    return Settings(api_url=api_url, token=found[0], api_url_source=url_src,
                    token_source=found[1])
