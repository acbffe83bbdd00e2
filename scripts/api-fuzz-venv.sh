#!/usr/bin/env bash
# The Python venv of the schema-driven API fuzz (crates/bhatti/tests/api_fuzz.rs):
# target/api-fuzz-venv with schemathesis from PyPI, pinned so that runs are
# comparable. Kept apart from the SDK's venv so neither pins the other's
# dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
venv=target/api-fuzz-venv
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  # Debian splits venv/ensurepip out of python3.
  echo "api-fuzz-venv: installing python3-venv"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
fi
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
fi
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
echo "api-fuzz-venv: ok ($("$venv/bin/schemathesis" --version))"
