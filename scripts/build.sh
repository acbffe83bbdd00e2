#!/usr/bin/env bash
# Builds the host binary (bhatti) and the static guest agent (lohar).
# Prints nothing but cargo's own progress; the binaries land in target/release/.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${PROFILE:-release}
flag=(); [ "$PROFILE" = release ] && flag=(--release)

cargo build "${flag[@]}" -p bhatti --bins
# lohar is PID 1 in a guest with no shared libraries to lean on: link it statically.
# An explicit --target keeps these flags off host build scripts and the host cache.
RUSTFLAGS="-C target-feature=+crt-static" cargo build "${flag[@]}" -p lohar --target x86_64-unknown-linux-gnu
install -m 0755 "target/x86_64-unknown-linux-gnu/$PROFILE/lohar" "target/$PROFILE/lohar-static"
