"""Fixtures: a real bhatti daemon named by $BHATTI_URL and $BHATTI_TOKEN
(the cargo test `sdk_python` starts one and runs these tests against it)."""

import os
import uuid

import pytest

from bhatti import Bhatti


def pytest_collection_modifyitems(config, items):
    if os.environ.get("BHATTI_URL") and os.environ.get("BHATTI_TOKEN"):
        return
    skip = pytest.mark.skip(reason="needs a daemon: set BHATTI_URL and BHATTI_TOKEN")
    for item in items:
        if "daemon" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "daemon: needs a running bhatti daemon")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def client():
    with Bhatti() as c:
        yield c


@pytest.fixture(scope="session")
def sb(client):
    """One sandbox shared by the sync tests (booting is the expensive part)."""
    s = client.create(name=unique("sdk"))
    yield s
    s.destroy()
