#!/usr/bin/env bash
# One command from a fresh Debian machine with Rust to a running daemon:
# system packages, build, guest images, default config, an `admin` user and
# its CLI config in ~/.bhatti/config.yaml. A second run reuses all of it.
#
#   sudo bash scripts/start.sh            # foreground; Ctrl+C stops the daemon (VMs keep running)
#
# Environment: BHATTI_DATA_DIR (default /var/lib/bhatti), BHATTI_LISTEN
# (default 127.0.0.1:8080), BHATTI_EGRESS (default true: sandboxes reach the internet).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "start: bhatti serve needs root (VMs, TAP devices, network namespaces); run: sudo bash scripts/start.sh" >&2
  exit 1
fi

DATA_DIR=${BHATTI_DATA_DIR:-/var/lib/bhatti}
LISTEN=${BHATTI_LISTEN:-127.0.0.1:8080}
EGRESS=${BHATTI_EGRESS:-true}
CONFIG="$DATA_DIR/config.yaml"
BIN="$PWD/target/release/bhatti"

bash scripts/setup.sh
echo "start: building bhatti and lohar (release)"
bash scripts/build.sh

mkdir -p "$DATA_DIR"
if [ ! -f "$CONFIG" ]; then
  echo "start: writing default config $CONFIG"
  cat > "$CONFIG" <<YAML
listen: $LISTEN
data_dir: $DATA_DIR
images_dir: $DATA_DIR/images
egress: $EGRESS
YAML
fi

export BHATTI_LOHAR="$PWD/target/release/lohar-static"
"$BIN" image build --config "$CONFIG"

CLI_CONFIG="$HOME/.bhatti/config.yaml"
if [ ! -f "$DATA_DIR/state.db" ] || ! "$BIN" user list --config "$CONFIG" --json | grep -q '"name": *"admin"'; then
  key=$("$BIN" user create --config "$CONFIG" --name admin --max-sandboxes 20 --max-cpus 4 --max-memory 8192 | grep -o 'bht_[A-Za-z0-9]*' | head -n1)
  fresh_key=1
else
  fresh_key=0
fi
if [ ! -f "$CLI_CONFIG" ]; then
  if [ "$fresh_key" = 0 ]; then
    # The admin key was shown once, long ago; a new one is the only way to write the CLI config.
    key=$("$BIN" user rotate-key --config "$CONFIG" admin | grep -o 'bht_[A-Za-z0-9]*' | head -n1)
  fi
  url="http://$LISTEN"
  mkdir -p "$HOME/.bhatti" && chmod 700 "$HOME/.bhatti"
  (umask 077 && printf 'api_url: %s\nauth_token: %s\n' "$url" "$key" > "$CLI_CONFIG")
  echo "start: wrote $CLI_CONFIG for user admin"
elif [ "$fresh_key" = 1 ]; then
  echo "start: created user admin; $CLI_CONFIG already exists and was left alone. The new key: $key"
fi

echo "start: starting bhatti serve (config $CONFIG)"
exec "$BIN" serve --config "$CONFIG"
