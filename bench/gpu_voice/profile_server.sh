#!/usr/bin/env bash
# Profile `voicefast serve` under load on a GPU host (issue 14 diagnosis): one bench.gpu_voice.run level in the
# background, then py-spy on the server while the level runs — who holds the GIL (--gil) and what every thread does.
#   bench/gpu_voice/profile_server.sh OUT LEVEL [PY_SPY] [extra run args...]
# Writes OUT/prof_gil.txt and OUT/prof_all.txt (py-spy raw/collapsed stacks, per thread) next to the run's files.
set -u
OUT=$1; LEVEL=$2; PYSPY=${3:-py-spy}; shift 3 || shift $#
python3 -m bench.gpu_voice.run --model embedded --levels "$LEVEL" --out "$OUT" --tag "prof$LEVEL" "$@" \
  > "$OUT/prof_run.log" 2>&1 &
RUN=$!
SRV=""
for _ in $(seq 120); do
  SRV=$(pgrep -f "voicefast serve --host 127.0.0.1" | head -1)
  [ -n "$SRV" ] && grep -q "server ready" "$OUT/prof_run.log" && break
  sleep 1
done
echo "[profile] server pid ${SRV:-none}"
sleep 25  # the callers' first turns
"$PYSPY" record --pid "$SRV" --subprocesses --gil --threads --rate 100 --duration 15 --format raw -o "$OUT/prof_gil.txt" --nonblocking 2>&1 | tail -2
"$PYSPY" record --pid "$SRV" --subprocesses --threads --rate 100 --duration 15 --format raw -o "$OUT/prof_all.txt" --nonblocking 2>&1 | tail -2
"$PYSPY" dump --pid "$SRV" --subprocesses > "$OUT/prof_dump.txt" 2>&1
wait $RUN
tail -3 "$OUT/prof_run.log"
