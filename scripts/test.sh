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
status=0
# Templates on (the default): creates restore a pre-booted guest.
BHATTI_TEMPLATES=1 cargo nextest run --workspace --all-features --no-fail-fast "$@" || status=$?

# The tests that make sandboxes through a daemon, again with templates off:
# every create boots a kernel (docs/templates.md).
echo "test: the VM, API and CLI tests again with templates off"
vm_tests='binary(api) | binary(cli_daemon) | binary(cli_fleet) | binary(cli_snapshot)
  | binary(control_socket) | binary(egress) | binary(exec_host) | binary(forks) | binary(idle)
  | binary(images) | binary(publish_proxy) | binary(pull) | binary(sdk_python) | binary(share)
  | binary(thermal) | binary(volumes)'
BHATTI_TEMPLATES=0 cargo nextest run -p bhatti --all-features --no-fail-fast -E "$vm_tests" "$@" || status=$?
exit $status
