"""Settings resolution and error mapping: no daemon needed."""

import pytest

from bhatti import errors
from bhatti.config import resolve


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("BHATTI_URL", raising=False)
    monkeypatch.delenv("BHATTI_TOKEN", raising=False)
    # The host's own daemon must not change the defaults.
    monkeypatch.setenv("BHATTI_SOCKET", str(tmp_path / "no-daemon.sock"))
    return tmp_path


def write_config(home, text):
    (home / ".bhatti").mkdir()
    (home / ".bhatti" / "config.yaml").write_text(text)


def test_default(home):
    s = resolve()
    assert (s.api_url, s.token, s.api_url_source) == ("http://127.0.0.1:8080", None, "default")


def test_env_then_config_then_argument(home, monkeypatch):
    monkeypatch.setenv("BHATTI_URL", "http://env:1/")
    monkeypatch.setenv("BHATTI_TOKEN", "bht_env")
    s = resolve()
    assert (s.api_url, s.token, s.api_url_source, s.token_source) == \
        ("http://env:1", "bht_env", "env", "env")
    write_config(home, "api_url: http://file:2\nauth_token: bht_file\n")
    s = resolve()
    assert (s.api_url, s.token, s.token_source) == ("http://file:2", "bht_file", "config")
    s = resolve("https://arg:3", "bht_arg")
    assert (s.api_url, s.token, s.api_url_source) == ("https://arg:3", "bht_arg", "argument")


def test_bad_config(home):
    write_config(home, "api_url: http://x\nsurprise: 1\n")
    with pytest.raises(errors.ConfigError, match="surprise"):
        resolve()


def test_bad_url(home):
    with pytest.raises(errors.ConfigError, match="http"):
        resolve("ftp://x")


@pytest.mark.parametrize("status,cls", [
    (400, errors.BadRequest), (401, errors.Unauthorized), (403, errors.PermissionDenied),
    (404, errors.NotFound), (409, errors.Conflict), (413, errors.TooLarge),
    (422, errors.LimitExceeded), (429, errors.RateLimited), (500, errors.InternalError),
    (503, errors.Unavailable), (507, errors.NoSpace), (418, errors.APIError),
])
def test_error_for_status(status, cls):
    e = errors.error_for(status, {"error": "why"})
    assert type(e) is cls and e.status == status and e.message == "why"


def test_control_socket(home, monkeypatch):
    import socket

    s = resolve("unix:///run/x/api.sock")
    assert (s.api_url, s.api_url_source) == ("unix:///run/x/api.sock", "argument")
    with pytest.raises(errors.ConfigError):
        resolve("unix://relative.sock")
    with pytest.raises(errors.ConfigError):
        resolve("ftp://x")
    # No URL configured: a usable socket at $BHATTI_SOCKET is the default...
    path = home / "api.sock"
    monkeypatch.setenv("BHATTI_SOCKET", str(path))
    assert resolve().api_url == "http://127.0.0.1:8080", "no socket there yet"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    try:
        s = resolve()
        assert (s.api_url, s.api_url_source) == (f"unix://{path}", "default")
        # ...and any configured URL wins over it.
        monkeypatch.setenv("BHATTI_URL", "http://env:1")
        assert resolve().api_url == "http://env:1"
    finally:
        srv.close()
