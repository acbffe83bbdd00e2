#!/usr/bin/env bash
# The whole test suite: system packages, build, guest images, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo nextest run --workspace --all-features --no-fail-fast "$@"
