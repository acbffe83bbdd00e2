#!/usr/bin/env bash
# Installs every system package bhatti needs to build, boot VMs and run its
# tests, then checks that every command the daemon and the tests call exists.
#
# Packages are not trusted by name: a machine may carry a newer qemu-utils from
# another suite, which `apt-get install qemu-system-x86` would then remove
# (measured: qemu-img gone, every create failing). So the QEMU family is asked
# for at one version, the candidate of qemu-system-x86, in the same single
# transaction as everything else that is missing, and the commands are checked
# afterwards. Idempotent: does nothing when every command is present.
set -euo pipefail

# command -> package that provides it on Debian 12.
declare -A TOOLS=(
  [qemu-system-x86_64]=qemu-system-x86 [qemu-img]=qemu-utils
  [nft]=nftables [ip]=iproute2 [mke2fs]=e2fsprogs [resize2fs]=e2fsprogs
  [mmdebstrap]=mmdebstrap [cpio]=cpio [zstd]=zstd [modinfo]=kmod
  [dpkg-deb]=dpkg [dpkg-architecture]=dpkg-dev [tmux]=tmux [python3]=python3
  [curl]=curl [strip]=binutils [update-ca-certificates]=ca-certificates
  [chromium]=chromium [docker-registry]=docker-registry [openssl]=openssl
  [setpriv]=util-linux
)

missing_tools() {
  local t
  for t in "${!TOOLS[@]}"; do
    # sbin tools are not on a non-root PATH; look there too.
    PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null 2>&1 || echo "$t"
  done
}

# QEMU's system emulator and its tools must come from one build: 7.2's
# qemu-system-common breaks every other qemu-utils.
qemu_mismatch() {
  command -v qemu-img >/dev/null 2>&1 && command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local a b
  a=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  b=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
  [ -n "$a" ] && [ -n "$b" ] && [ "$a" != "$b" ]
}

mapfile -t missing < <(missing_tools)
if ((${#missing[@]})) || qemu_mismatch; then
  export DEBIAN_FRONTEND=noninteractive
  echo "setup: missing ${missing[*]:-(none)}; installing"
  apt-get update -q
  pkgs=()
  for t in "${missing[@]}"; do pkgs+=("${TOOLS[$t]}"); done
  qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
  if [ -z "$qv" ] || [ "$qv" = "(none)" ]; then
    echo "setup: no installable qemu-system-x86 in the configured apt sources" >&2
    exit 1
  fi
  # Always name both QEMU packages at one version so apt resolves them together.
  pkgs+=("qemu-system-x86=$qv" "qemu-utils=$qv")
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | grep -v '^qemu-system-x86$\|^qemu-utils$' | sort -u)
  apt-get install -y -q --no-install-recommends --allow-downgrades "${pkgs[@]}"
fi

mapfile -t still < <(missing_tools)
if ((${#still[@]})); then
  echo "setup: still missing after install: ${still[*]}" >&2
  exit 1
fi
if qemu_mismatch; then
  echo "setup: qemu-utils and qemu-system-x86 are at different versions" >&2
  exit 1
fi
echo "setup: ok ($(qemu-system-x86_64 --version | head -n1); $(qemu-img --version | head -n1))"
