#!/usr/bin/env bash
# The whole test suite: system packages, the static guest agent, the guest
# images (built once, cached in /var/lib/bhatti/images), then every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "test: the suite boots VMs and creates network namespaces; run it as root" >&2
  exit 1
fi

bash scripts/setup.sh

echo "test: building the static lohar"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p lohar --target x86_64-unknown-linux-gnu
export BHATTI_LOHAR="$PWD/target/x86_64-unknown-linux-gnu/release/lohar"

echo "test: Python venv for the SDK and browser tests"
bash scripts/sdk-venv.sh

echo "test: Python venv for the API fuzz (schemathesis)"
bash scripts/api-fuzz-venv.sh

echo "test: guest images"
cargo build -p bhatti --bins
target/debug/bhatti image build

# A failing test's panic message, not its backtrace, ends its output (CI
# shows the tail).
export RUST_BACKTRACE=0
cargo nextest run --workspace --all-features --no-fail-fast "$@"
