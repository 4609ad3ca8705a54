#!/usr/bin/env bash
# A profile of ringkv's server CPUs that anyone can rerun: starts a local
# 3-node cluster (ringkv cluster up, under taskset on --server-cpus), runs a
# workload against it from --client-cpus, records the server CPUs with
# `perf record -C` over the measured window only (the load and the warm-up
# are left out), and writes under --out:
#   flame.svg   the flame graph (inferno, through `ringkv-bench flamegraph`)
#   top.md      time per process and the top 30 functions by self time
#   run.json    the run's results (+ .hgrm), run.txt its summary
#   perf.data   the recording, for `perf report -i` (perf.script is deleted
#               unless --keep-script)
# Everything it starts, it stops (by pid, on any exit). Needs perf, as root
# (or perf_event_paranoid <= 0) for -C.
#
#   bench/profile.sh [--workload c] [--duration 10s] [--warmup 2s] [--records 100000]
#                    [--r one|quorum|all|N] [--w ...] [--durable no|yes|default]
#                    [--pipeline 1] [--concurrency 8] [--client-cpus 0] [--server-cpus 1]
#                    [--call-graph dwarf|fp|lbr] [--freq 999] [--out DIR] [--keep-script] [--no-build]
# --call-graph: how perf unwinds stacks. dwarf (default) copies 8 KiB of stack
#   per sample and unwinds it afterwards with the debug info (release builds
#   have debug=1); fp is much cheaper but ringkv is built without frame
#   pointers, so user-space stacks come out cut short.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORKLOAD=c
DURATION=10s
WARMUP=2s
RECORDS=100000
R=
W=
DURABLE=no
PIPELINE=1
CONCURRENCY=8
CLIENT_CPUS=0
SERVER_CPUS=1
CALL_GRAPH=dwarf
FREQ=999
OUT=
KEEP_SCRIPT=0
BUILD=1

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --workload) WORKLOAD=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --records) RECORDS=$2; shift 2 ;;
    --r) R=$2; shift 2 ;;
    --w) W=$2; shift 2 ;;
    --durable) DURABLE=$2; shift 2 ;;
    --pipeline) PIPELINE=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --client-cpus) CLIENT_CPUS=$2; shift 2 ;;
    --server-cpus) SERVER_CPUS=$2; shift 2 ;;
    --call-graph) CALL_GRAPH=$2; shift 2 ;;
    --freq) FREQ=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --keep-script) KEEP_SCRIPT=1; shift ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown option $1" >&2; usage 2 ;;
  esac
done
case "$CALL_GRAPH" in dwarf|fp|lbr) ;; *) echo "--call-graph takes dwarf, fp or lbr" >&2; exit 2 ;; esac
command -v perf >/dev/null || { echo "perf is not installed (Debian: linux-perf)" >&2; exit 1; }
OUT=${OUT:-bench-results/profile-$WORKLOAD-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/ringkv-profile.XXXXXX)
PIDS=()

# Stops what we started, by pid: SIGTERM, a grace period, then SIGKILL.
cleanup() {
  local rc=$?
  set +e
  if [ ${#PIDS[@]} -gt 0 ]; then
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 50); do
      local alive=0
      for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ $alive -eq 0 ] && break
      sleep 0.2
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  fi
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # host port [seconds]
  local deadline=$((SECONDS + ${3:-60}))
  until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "nothing listens on $1:$2" >&2; return 1; }
    sleep 0.1
  done
}

if [ $BUILD -eq 1 ]; then
  echo "== building (release)"
  (cd "$ROOT" && cargo build --release --quiet -p ringkv-bench -p ringkv-tools)
fi
BENCH="$ROOT/target/release/ringkv-bench"
RINGKV="$ROOT/target/release/ringkv"

echo "== 3-node cluster on CPUs $SERVER_CPUS"
taskset -c "$SERVER_CPUS" "$RINGKV" cluster up --nodes 3 --dir "$WORK/ringkv" --no-pin >"$OUT/cluster.log" 2>&1 &
PIDS+=($!)
for ip in 127.0.0.1 127.0.0.2 127.0.0.3; do wait_port $ip 7070 120; done
deadline=$((SECONDS + 120))
until "$RINGKV" put --endpoint 127.0.0.1:7070 profile-probe ok >/dev/null 2>&1 &&
      "$RINGKV" put --endpoint 127.0.0.2:7070 profile-probe ok >/dev/null 2>&1 &&
      "$RINGKV" put --endpoint 127.0.0.3:7070 profile-probe ok >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || { echo "ringkv does not accept writes; log:" >&2; tail -20 "$OUT/cluster.log" >&2; exit 1; }
  sleep 0.5
done

WINDOW="$WORK/window"
ARGS=(--target ringkv://127.0.0.1:7070 --workload "$WORKLOAD" --records "$RECORDS" --duration "$DURATION"
      --warmup "$WARMUP" --concurrency "$CONCURRENCY" --pipeline "$PIPELINE" --durable "$DURABLE"
      --client-cpus "$CLIENT_CPUS" --server-cpus "$SERVER_CPUS" --label "ringkv-$WORKLOAD" --no-progress
      --json "$OUT/run.json" --window-file "$WINDOW" ${R:+--r "$R"} ${W:+--w "$W"})
echo "== ringkv-bench run ${ARGS[*]}"
"$BENCH" run "${ARGS[@]}" >"$OUT/run.txt" 2>"$OUT/run.log" &
RUN_PID=$!; PIDS+=("$RUN_PID")

# The harness writes the window's CLOCK_MONOTONIC start and end when the
# measured window opens; perf records from then until the window closes.
until [ -s "$WINDOW" ]; do
  kill -0 "$RUN_PID" 2>/dev/null || { echo "the run ended before its measured window; log:" >&2; cat "$OUT/run.log" >&2; exit 1; }
  sleep 0.05
done
read -r START END <"$WINDOW"
LEFT=$(awk -v s="$START" -v e="$END" 'BEGIN { printf "%.3f", e - s }')
echo "== perf record -C $SERVER_CPUS --call-graph $CALL_GRAPH -F $FREQ for the ${LEFT}s window"
perf record -C "$SERVER_CPUS" --call-graph "$CALL_GRAPH" -F "$FREQ" -k CLOCK_MONOTONIC -o "$OUT/perf.data" \
  -- sleep "$LEFT" 2>"$OUT/perf-record.log"
wait "$RUN_PID" || { echo "the run failed; log:" >&2; cat "$OUT/run.log" >&2; exit 1; }
cat "$OUT/run.txt"

echo "== perf script (samples inside the window only)"
perf script -i "$OUT/perf.data" --time "$START,$END" >"$OUT/perf.script" 2>"$OUT/perf-script.log"
TITLE="ringkv server CPUs $SERVER_CPUS: workload $WORKLOAD, durable $DURABLE${R:+, r=$R}${W:+, w=$W}, $CONCURRENCY conn x pipeline $PIPELINE"
"$BENCH" flamegraph --perf-script "$OUT/perf.script" --svg "$OUT/flame.svg" --top "$OUT/top.md" --title "$TITLE"
[ $KEEP_SCRIPT -eq 1 ] || rm -f "$OUT/perf.script"
sed -n '1,12p' "$OUT/top.md"
echo
echo "flame graph $OUT/flame.svg, top functions $OUT/top.md, recording $OUT/perf.data"
