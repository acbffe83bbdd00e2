#!/usr/bin/env bash
# Installs every system package bhatti needs to build, boot VMs and run its tests.
# Idempotent: does nothing when all packages are already present.
set -euo pipefail

PACKAGES=(
  qemu-system-x86 qemu-utils nftables iproute2 e2fsprogs mmdebstrap cpio
  zstd kmod dpkg-dev tmux python3 curl ca-certificates binutils
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
