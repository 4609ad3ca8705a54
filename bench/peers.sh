#!/usr/bin/env bash
# ringkv against its peers: the same workload, one target after another, in
# one run: the echo floor, a single Redis (appendonly, fsync every second), a
# Redis Cluster (3 masters, 3 replicas), and a local 3-node ringkv cluster.
# Writes one JSON/.hgrm/SVG set per target, a comparison table and one
# overlaid latency plot under --out. Everything it starts, it stops (by pid,
# on any exit). Loopback only.
#
#   bench/peers.sh [--out DIR] [--workload a] [--records N] [--value-size B]
#                  [--duration 10s] [--warmup 2s] [--concurrency C] [--pipeline P]
#                  [--rate OPS] [--client-cpus 0] [--server-cpus 1]
#                  [--ringkv-durable no|yes|default] [--skip echo,redis,redis-cluster,ringkv]
#                  [--half]
# With --half, each target runs twice per workload (--workload may list
# several, comma-separated): closed loop at --concurrency (saturation), then
# open loop at half of ringkv's saturation rate; the table then gives
# throughput at saturation, latency at 50% load, and ringkv's ratios to each
# peer and to the echo floor (needs python3).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=bench-results
WORKLOAD=a
RECORDS=100000
VALUE_SIZE=1024
DURATION=10s
WARMUP=2s
CONCURRENCY=8
PIPELINE=1
RATE=
CLIENT_CPUS=0
SERVER_CPUS=1
RINGKV_DURABLE=no
SKIP=
HALF=0

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --workload) WORKLOAD=$2; shift 2 ;;
    --records) RECORDS=$2; shift 2 ;;
    --value-size) VALUE_SIZE=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --pipeline) PIPELINE=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --client-cpus) CLIENT_CPUS=$2; shift 2 ;;
    --server-cpus) SERVER_CPUS=$2; shift 2 ;;
    --ringkv-durable) RINGKV_DURABLE=$2; shift 2 ;;
    --skip) SKIP=$2; shift 2 ;;
    --half) HALF=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown option $1" >&2; usage 2 ;;
  esac
done

skipped() { [[ ",$SKIP," == *",$1,"* ]]; }

RUN_DIR="$OUT/peers-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"
WORK=$(mktemp -d /tmp/ringkv-peers.XXXXXX)
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

# Stops the given pids now (to free the server cores for the next target).
stop() {
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  local keep=()
  for p in "${PIDS[@]}"; do [[ " $* " == *" $p "* ]] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

wait_port() { # host port [seconds]
  local deadline=$((SECONDS + ${3:-60}))
  until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "nothing listens on $1:$2" >&2; return 1; }
    sleep 0.1
  done
}

echo "== building (release)"
(cd "$ROOT" && cargo build --release --quiet -p ringkv-bench -p ringkv-tools)
BENCH="$ROOT/target/release/ringkv-bench"
RINGKV="$ROOT/target/release/ringkv"

if ! skipped redis || ! skipped redis-cluster; then
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "== installing redis-server from Debian"
    # Keep the package from starting its own service on 6379.
    POLICY=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e $POLICY ]; then printf '#!/bin/sh\nexit 101\n' >$POLICY; chmod +x $POLICY; made_policy=1; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
    [ $made_policy -eq 1 ] && rm -f $POLICY
  fi
fi

RESULTS=()

# Runs every target once: $1 names the phase (used in file names), the rest
# are extra `run` arguments (a rate for the open-loop phase).
run_targets() {
  local phase=$1; shift
  local COMMON=(--workload "$WL" --records "$RECORDS" --value-size "$VALUE_SIZE" --duration "$DURATION"
                --warmup "$WARMUP" --concurrency "$CONCURRENCY" --pipeline "$PIPELINE" --client-cpus "$CLIENT_CPUS" "$@")
  bench() { # name target [extra args...]
    local name=$1 target=$2; shift 2
    echo "== $WL/$phase $name: $target (client on CPUs $CLIENT_CPUS)"
    "$BENCH" run --target "$target" "${COMMON[@]}" --label "$name" --json "$RUN_DIR/$WL-$phase-$name.json" --no-progress "$@"
    RESULTS+=("$RUN_DIR/$WL-$phase-$name.json")
  }
  if ! skipped echo; then
    taskset -c "$SERVER_CPUS" "$BENCH" echo-server --listen 127.0.0.1:7999 >"$WORK/echo.log" 2>&1 &
    ECHO_PID=$!; PIDS+=("$ECHO_PID")
    wait_port 127.0.0.1 7999
    bench echo echo://127.0.0.1:7999
    stop "$ECHO_PID"
  fi

  if ! skipped redis; then
    mkdir -p "$WORK/redis"
    taskset -c "$SERVER_CPUS" redis-server --bind 127.0.0.1 --port 6390 --dir "$WORK/redis" --appendonly yes \
      --appendfsync everysec --save '' --protected-mode no --daemonize no >"$WORK/redis.log" 2>&1 &
    REDIS_PID=$!; PIDS+=("$REDIS_PID")
    wait_port 127.0.0.1 6390
    bench redis redis://127.0.0.1:6390
    stop "$REDIS_PID"
  fi

  if ! skipped redis-cluster; then
    CLUSTER_PIDS=()
    rm -rf "$WORK/cluster"   # a fresh cluster per phase: create refuses nodes that know each other
    for port in 7000 7001 7002 7003 7004 7005; do
      mkdir -p "$WORK/cluster/$port"
      taskset -c "$SERVER_CPUS" redis-server --bind 127.0.0.1 --port $port --dir "$WORK/cluster/$port" \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 --appendonly yes \
        --appendfsync everysec --save '' --protected-mode no --daemonize no >"$WORK/cluster/$port.log" 2>&1 &
      CLUSTER_PIDS+=($!); PIDS+=($!)
    done
    for port in 7000 7001 7002 7003 7004 7005; do wait_port 127.0.0.1 $port; done
    redis-cli --cluster create 127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002 127.0.0.1:7003 127.0.0.1:7004 \
      127.0.0.1:7005 --cluster-replicas 1 --cluster-yes >"$WORK/cluster-create.log"
    deadline=$((SECONDS + 60))
    for port in 7000 7001 7002 7003 7004 7005; do
      until [[ "$(redis-cli -p $port cluster info 2>/dev/null)" == *cluster_state:ok* ]]; do
        [ $SECONDS -lt $deadline ] || { echo "redis cluster not ok" >&2; exit 1; }
        sleep 0.2
      done
    done
    bench redis-cluster redis://127.0.0.1:7000 --cluster
    stop "${CLUSTER_PIDS[@]}"
  fi

  if ! skipped ringkv; then
    RINGKV_HELP=$("$RINGKV" --help)
    if grep -qE '^ +cluster ' <<<"$RINGKV_HELP"; then
      # On the server CPUs, like the Redis processes; the OS places the shards.
    rm -rf "$WORK/ringkv"
    taskset -c "$SERVER_CPUS" "$RINGKV" cluster up --nodes 3 --dir "$WORK/ringkv" --no-pin >"$WORK/ringkv.log" 2>&1 &
      RINGKV_PID=$!; PIDS+=("$RINGKV_PID")
      for ip in 127.0.0.1 127.0.0.2 127.0.0.3; do wait_port $ip 7070 120; done
      NOTE="3-node local cluster (ringkv cluster up, N=3), on CPUs $SERVER_CPUS; requests routed by topology to each key's first replica"
    else
      "$RINGKV" server --listen 127.0.0.1:7070 --data-dir "$WORK/ringkv" --shards 1 >"$WORK/ringkv.log" 2>&1 &
      RINGKV_PID=$!; PIDS+=("$RINGKV_PID")
      wait_port 127.0.0.1 7070 120
      NOTE="SINGLE NODE: this ringkv binary has no 'cluster up' yet"
    fi
    # Serving once a write succeeds (the ring may still be forming).
    deadline=$((SECONDS + 120))
    until "$RINGKV" put --endpoint 127.0.0.1:7070 peers-probe ok >/dev/null 2>&1 &&
          "$RINGKV" put --endpoint 127.0.0.2:7070 peers-probe ok >/dev/null 2>&1 &&
          "$RINGKV" put --endpoint 127.0.0.3:7070 peers-probe ok >/dev/null 2>&1; do
      [ $SECONDS -lt $deadline ] || { echo "ringkv does not accept writes; log:" >&2; tail -20 "$WORK/ringkv.log" >&2; exit 1; }
      sleep 0.5
    done
    echo "== ringkv: $NOTE"
    bench ringkv ringkv://127.0.0.1:7070 --durable "$RINGKV_DURABLE"
    stop "$RINGKV_PID"
  fi
}

for WL in ${WORKLOAD//,/ }; do
  if [ $HALF -eq 1 ]; then
    run_targets sat
    sat=$(sed -n 's/^  "ops_per_sec": \([0-9.]*\),$/\1/p' "$RUN_DIR/$WL-sat-ringkv.json" 2>/dev/null | head -1)
    [ -n "$sat" ] || { echo "no ringkv saturation result for workload $WL" >&2; exit 1; }
    half=$(python3 -c "print(max(1, int(float('$sat') / 2)))")
    echo "== $WL: ringkv saturates at $sat ops/s; open loop at $half ops/s for every target"
    run_targets half --rate "$half"
  else
    run_targets run ${RATE:+--rate "$RATE"}
  fi
done

[ ${#RESULTS[@]} -gt 0 ] || { echo "every target was skipped" >&2; exit 2; }
if [ $HALF -eq 1 ]; then
  python3 - "$RUN_DIR" "$WORKLOAD" >"$RUN_DIR/summary.md" <<'PY'
import json, os, sys
run, workloads = sys.argv[1], sys.argv[2].split(',')
peers = ['echo', 'redis', 'redis-cluster']
def load(wl, phase, name):
    p = os.path.join(run, f'{wl}-{phase}-{name}.json')
    return json.load(open(p)) if os.path.exists(p) else None
def pct(r, key):
    a = r.get('all') or {}
    return a.get(key)
print('| workload | target | saturation ops/s | p50 us @50% | p99 us @50% | p99.9 us @50% | client CPU us/op | server CPU us/op |')
print('|---|---|---|---|---|---|---|---|')
for wl in workloads:
    for name in peers + ['ringkv']:
        s, h = load(wl, 'sat', name), load(wl, 'half', name)
        if not s or not h:
            continue
        print(f"| {wl.upper()} | {name} | {s['ops_per_sec']:.0f} | {pct(h,'p50_us'):.0f} | {pct(h,'p99_us'):.0f} | "
              f"{pct(h,'p999_us'):.0f} | {s.get('client_cpu_us_per_op', 0):.1f} | {s.get('server_cpu_us_per_op') or 0:.1f} |")
print()
print('ringkv as a ratio of each peer (ringkv / peer; throughput: higher is better, latency: lower is better):')
print()
print('| workload | vs | saturation | p50 | p99 | p99.9 |')
print('|---|---|---|---|---|---|')
for wl in workloads:
    rs, rh = load(wl, 'sat', 'ringkv'), load(wl, 'half', 'ringkv')
    if not rs or not rh:
        continue
    for name in peers:
        s, h = load(wl, 'sat', name), load(wl, 'half', name)
        if not s or not h:
            continue
        ratio = lambda a, b: f'{a / b:.2f}' if b else 'n/a'
        print(f"| {wl.upper()} | {name} | {ratio(rs['ops_per_sec'], s['ops_per_sec'])} | {ratio(pct(rh,'p50_us'), pct(h,'p50_us'))} | "
              f"{ratio(pct(rh,'p99_us'), pct(h,'p99_us'))} | {ratio(pct(rh,'p999_us'), pct(h,'p999_us'))} |")
PY
  cat "$RUN_DIR/summary.md"
fi
{
  echo "# ringkv and peers: workload(s) $WORKLOAD, $RECORDS records, values $VALUE_SIZE B, $CONCURRENCY conn x pipeline $PIPELINE${RATE:+, open loop at $RATE ops/s}"
  echo
  echo "client pinned to CPUs $CLIENT_CPUS; echo and Redis servers on CPUs $SERVER_CPUS; ringkv placement as below."
  echo "Redis: appendonly yes, appendfsync everysec. ringkv writes: durable=$RINGKV_DURABLE."
  [ -n "${NOTE:-}" ] && echo "ringkv: $NOTE."
  echo
  "$BENCH" compare "${RESULTS[@]}"
  echo
  for r in "${RESULTS[@]}"; do
    printf -- '- %s: %s\n' "$(basename "$r" .json)" \
      "$(sed -n 's/^  "server_placement": "\(.*\)",$/\1/p' "$r")"
  done
} >"$RUN_DIR/comparison.md"
"$BENCH" plot "${RESULTS[@]}" --out "$RUN_DIR/latency.svg" >/dev/null
cat "$RUN_DIR/comparison.md"
echo
echo "results, .hgrm files and plots in $RUN_DIR (overlaid plot: $RUN_DIR/latency.svg)"
