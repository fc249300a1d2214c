#!/usr/bin/env bash
# Restart systemd replicas (deploy/voicefast@.service) one at a time without dropping a call:
#   deploy/rolling-restart.sh 8001 8002
# Each restart drains the replica (SIGTERM: HAProxy sends new calls to the others, live calls finish), starts it
# again, and waits until its /readyz answers 200 before the next one goes down.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 PORT [PORT ...]" >&2; exit 2; }
READY_TIMEOUT_S="${READY_TIMEOUT_S:-600}"
for port in "$@"; do
  echo "[rolling] voicefast@${port}: draining and restarting"
  systemctl restart "voicefast@${port}"
  for ((i = 0; i < READY_TIMEOUT_S; i++)); do
    if curl -fsS "http://127.0.0.1:${port}/readyz" >/dev/null 2>&1; then
      echo "[rolling] voicefast@${port}: ready"
      break
    fi
    sleep 1
  done
  curl -fsS "http://127.0.0.1:${port}/readyz" >/dev/null || { echo "[rolling] voicefast@${port} not ready" >&2; exit 1; }
  sleep 3  # HAProxy's `rise 2` at 1 s intervals: let it take the replica back before the next one drains
done
