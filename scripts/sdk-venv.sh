#!/usr/bin/env bash
# The Python venv the tests use: target/sdk-venv with the SDK installed the
# way users install it (`pip install ./sdk/python`, plus its test extra:
# pytest). The browser test of `bhatti share` drives Chromium with its
# `websockets`. Reinstalls the SDK every run so packaging stays tested.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/sdk-venv
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  # Debian splits venv/ensurepip out of python3.
  echo "sdk-venv: installing python3-venv"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
fi
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check "./sdk/python[test]"
echo "sdk-venv: ok ($("$venv/bin/python" -c 'import bhatti, httpx, websockets; print("bhatti", bhatti.__version__, "httpx", httpx.__version__, "websockets", websockets.__version__)'))"
