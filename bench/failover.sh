#!/usr/bin/env bash
# Riding through failures, measured through the harness (issue 14 point 5):
# a 3-node cluster (N=3, r=w=2, durable, one shard each) on the server CPUs,
# an open loop of workload A from ringkv-bench on the client CPUs, run three
# times on fresh clusters: healthy, with one node SIGSTOPped for 5 s, and
# with one node killed. Prints each run's p50, p99, p99.9, max, errors and
# failovers, and the goal: p99 under a fault <= 2 x healthy p99 + the
# attempt deadline (the harness derives it as the client library does:
# twice the observed p99, at least 50 ms).
#
#   bench/failover.sh [--rate 2000] [--duration 12s] [--client-cpus 0] [--server-cpus 1]
#
# Every node is stopped by pid when the script ends, however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=2000 DURATION=12s CLIENT_CPUS=0 SERVER_CPUS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) RATE=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --client-cpus) CLIENT_CPUS=$2; shift 2 ;;
    --server-cpus) SERVER_CPUS=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

cargo build --release --quiet --bin ringkv --bin ringkv-bench
RINGKV=target/release/ringkv
BENCH=target/release/ringkv-bench
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  local rc=$?
  set +e
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do kill -CONT "$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT=17170
start_cluster() { # dir
  PIDS=()
  local seeds="127.0.0.1:$PORT,127.0.0.2:$PORT,127.0.0.3:$PORT"
  for i in 1 2 3; do
    RINGKV_LOG=warn taskset -c "$SERVER_CPUS" "$RINGKV" server --node-id "n$i" --listen "127.0.0.$i:$PORT" \
      --data-dir "$1/n$i" --seeds "$seeds" --shards 1 --replicas 3 --no-pin --request-timeout-ms 2000 \
      >"$1/n$i.log" 2>&1 &
    PIDS+=($!)
  done
  local deadline=$((SECONDS + 60))
  until "$RINGKV" status --endpoint "127.0.0.1:$PORT" --json 2>/dev/null | grep -o '"status": *"up"' | wc -l | grep -qx 3; do
    [ $SECONDS -lt $deadline ] || { echo "the cluster did not form:" >&2; tail -n 5 "$1"/n*.log >&2; exit 1; }
    sleep 0.5
  done
}

run() { # fault
  local dir="$WORK/$1"
  mkdir -p "$dir"
  PORT=$((PORT + 10)) # a fresh port: nothing of the last run lingers on it
  start_cluster "$dir"
  "$BENCH" run --target "ringkv://127.0.0.1:$PORT" --workload a --records 10000 --rate "$RATE" \
    --duration "$DURATION" --warmup 2s --concurrency 8 --client-cpus "$CLIENT_CPUS" --no-progress \
    --json "$dir/run.json" >"$dir/bench.log" 2>&1 &
  local bench=$!
  # The load phase of 10,000 records, the warm-up, then 3 s of measuring.
  sleep 8
  case "$1" in
    stop) kill -STOP "${PIDS[1]}"; sleep 5; kill -CONT "${PIDS[1]}" ;;
    kill) kill -KILL "${PIDS[2]}"; { wait "${PIDS[2]}"; } 2>/dev/null || true ;;
  esac
  wait "$bench" || { cat "$dir/bench.log" >&2; exit 1; }
  python3 - "$1" "$dir/run.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[2]))
a = v["all"]
print(f"| {sys.argv[1]} | {v['ops_per_sec']:.0f} | {a['p50_us']/1000:.2f} | {a['p99_us']/1000:.2f} | "
      f"{a['p999_us']/1000:.1f} | {a['max_us']/1000:.0f} | {v['errors']} | {v.get('failovers', 0)} |")
PY
  for pid in "${PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do { wait "$pid"; } 2>/dev/null || true; done
  PIDS=()
}

echo "| run | ops/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | failovers |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for fault in healthy stop kill; do run "$fault"; done
