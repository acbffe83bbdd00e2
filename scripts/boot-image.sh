#!/usr/bin/env bash
# Boots the built guest images once under QEMU microvm (TCG) with NO network
# device and reports boot timings from the console. An experiment and a smoke
# test of `bhatti image build`; the engine owns real VM lifecycle.
#
#   scripts/boot-image.sh [IMAGES_DIR]     (default /var/lib/bhatti/images)
#
# Overrides for experiments: KERNEL=, INITRD= (instead of current.json's),
# EXTRA_CMDLINE= (appended), QUIET= (empty: full kernel log; e.g. with
# EXTRA_CMDLINE="initcall_debug loglevel=8" to see where boot time goes).
#
# The guest runs an init script that prints a few facts on the console and
# then sends SIGTERM to PID 1, so a clean run also proves power-off works.
set -euo pipefail

IMAGES=${1:-/var/lib/bhatti/images}
cur="$IMAGES/current.json"
[[ -f $cur ]] || { echo "no $cur: run 'bhatti image build' first" >&2; exit 1; }
get() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$cur" "$1"; }
KERNEL=${KERNEL:-$(get kernel)} INITRD=${INITRD:-$(get initramfs)} ROOTFS=$(get rootfs)

work=$(mktemp -d /tmp/bhatti-boot.XXXXXX)
trap 'rm -rf "$work"' EXIT
qemu-img create -q -f qcow2 -b "$ROOTFS" -F raw "$work/overlay.qcow2"

# The guest's TSC frequency must be given, or it sometimes hangs calibrating under TCG.
khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)

init='{ echo "check: user=$(id -un) host=$(hostname) cwd=$(pwd) date=$(date -u +%FT%TZ)";
  findmnt -rn -o TARGET,FSTYPE | tr "\n" " "; echo;
  ls /dev/fd/ >/dev/null && echo "check: /dev/fd ok"; sudo -n true && echo "check: sudo ok";
  grep nameserver /etc/resolv.conf; ip -br addr; } 2>&1 | sudo tee /dev/console >/dev/null
sudo kill -TERM 1'
python3 - "$work/cfg.json" "$init" <<'PY'
import json, sys, time
json.dump({"hostname": "bootcheck", "token": "t", "ip": "", "gateway": "",
           "dns": ["192.0.2.53"], "init": sys.argv[2],
           "time_unix_ms": int(time.time() * 1000)}, open(sys.argv[1], "w"))
PY

argv=(qemu-system-x86_64 -M microvm -accel tcg,tb-size=64 -cpu max -m 512 -smp 1
  -nodefaults -no-user-config -nographic -no-reboot
  -kernel "$KERNEL" -initrd "$INITRD"
  -append "console=ttyS0 ${QUIET-quiet} tsc_early_khz=$khz tsc=reliable panic=-1 cryptomgr.notests ${EXTRA_CMDLINE:-}"
  -fw_cfg "name=opt/bhatti/config,file=$work/cfg.json"
  -drive "id=root,file=$work/overlay.qcow2,format=qcow2,if=none" -device virtio-blk-device,drive=root
  -serial "file:$work/console.log")
echo "argv: ${argv[*]}"

now() { date +%s%N; }
t0=$(now)
"${argv[@]}" &
qemu=$!
t_stage1="" t_ready=""
deadline=$((t0 + 60 * 1000000000))
while kill -0 "$qemu" 2>/dev/null; do
  log=$(cat "$work/console.log" 2>/dev/null || true)
  [[ -z $t_stage1 && $log == *"lohar: stage 1"* ]] && t_stage1=$(now)
  [[ -z $t_ready && $log == *"lohar: ready"* ]] && t_ready=$(now)
  if (($(now) > deadline)); then echo "timeout: killing QEMU" >&2; kill "$qemu"; break; fi
  sleep 0.01
done
wait "$qemu" || true
t_end=$(now)
ms() { [[ -n $1 ]] && echo "$(( ($1 - t0) / 1000000 )) ms" || echo "never"; }
echo "--- console ---"
cat "$work/console.log"
echo "--- wall time from QEMU start ---"
echo "stage 1 (/init running, modules loaded): $(ms "$t_stage1")"
echo "lohar ready (listening):                 $(ms "$t_ready")"
echo "QEMU exited (power-off):                 $(ms "$t_end")"
grep -q "lohar: ready" "$work/console.log" && grep -q "check: sudo ok" "$work/console.log"
