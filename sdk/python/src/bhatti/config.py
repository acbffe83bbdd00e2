"""Where the client connects, resolved like the ``bhatti`` CLI does:

``argument > ~/.bhatti/config.yaml > $BHATTI_URL / $BHATTI_TOKEN > default``

The config file holds ``api_url`` and ``auth_token`` (``bhatti setup``
writes it). The default URL is ``http://127.0.0.1:8080``; there is no
default token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .errors import ConfigError

DEFAULT_API_URL = "http://127.0.0.1:8080"
URL_ENV = "BHATTI_URL"
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
        (DEFAULT_API_URL, "default"),
    ]
    api_url, url_src = next((v, s) for v, s in candidates if v)
    api_url = str(api_url).rstrip("/")
    if not api_url.startswith(("http://", "https://")):
        raise ConfigError(f"API URL {api_url!r} must start with http:// or https://")
    tok_candidates = [
        (token, "argument"),
        (cfg.get("auth_token"), "config"),
        (os.environ.get(TOKEN_ENV), "env"),
    ]
    found = next(((v, s) for v, s in tok_candidates if v), (None, None))
    return Settings(api_url=api_url, token=found[0], api_url_source=url_src,
                    token_source=found[1])
