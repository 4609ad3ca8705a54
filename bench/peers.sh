#!/usr/bin/env bash
# ringkv against its peers and the machine's floors: the same workload, one
# row after another, in one run. Rows (in the order they run):
#   echo            the echo server: zero hops, the loopback round trip
#   relay1          echo behind one relay-server: the cost of one hop
#   relay2          echo behind two chained relays: two hops
#   redis           single Redis, appendonly yes, appendfsync everysec
#   redis-durable   single Redis, appendonly yes, appendfsync always
#   redis-cluster   3 masters + 3 replicas, appendfsync everysec
#   ringkv          local 3-node cluster (N=3), writes --durable no
#   ringkv-durable  the same, writes --durable yes (fsync before the ack)
#   ringkv-r1       the same as ringkv, reads at --r one (meant for workload c)
#   ringkv-cr       the same as ringkv, reads client-driven (--reads client: the
#                   harness asks r replicas for their copies itself)
#   ringkv-base*    with --baseline BIN: the ringkv rows again, with that binary
#                   (an earlier build), so before and after share one run
# Every server runs on --server-cpus, the client on --client-cpus, and every
# run reports the server CPUs' busy share beside the CPU time of the server
# processes it found. Writes one JSON/.hgrm/SVG set per row, a comparison
# table and a latency plot (a panel per workload and load) under --out.
# Everything it starts, it stops (by pid, on any exit). Loopback only.
#
#   bench/peers.sh [--out DIR] [--workload a[,c]] [--records N] [--value-size B]
#                  [--duration 10s] [--warmup 2s] [--concurrency C] [--pipeline P]
#                  [--rate OPS] [--client-cpus 0] [--server-cpus 1]
#                  [--targets ROW,..|all] [--skip ROW,..] [--ringkv-durable yes|no|both]
#                  [--half] [--half-of ROW] [--no-build] [--baseline BIN]
# --targets: the rows to run [default: all but ringkv-r1 and the baselines; `all`: every row].
# --skip: rows to leave out of those. --ringkv-durable yes|no keeps only
#   ringkv-durable or only ringkv (the older single-row form) [default: both].
# --half: each row runs twice per workload: closed loop at --concurrency
#   (saturation), then open loop at half of ringkv's saturation (of the
#   slowest ringkv row run, or of --half-of ROW); summary.md then gives
#   throughput at saturation, latency at 50% load, server CPU per operation
#   (processes and whole cores), and the ratios of each ringkv row to the
#   floors (echo, relay1, relay2) and to the Redis rows (needs python3).
# --no-build: use target/release as it is.
# --baseline BIN: adds ringkv-base and ringkv-base-durable (and ringkv-base-r1
#   when ringkv-r1 runs) with the ringkv binary BIN.
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
ALL_ROWS=echo,relay1,relay2,redis,redis-durable,redis-cluster,ringkv,ringkv-durable,ringkv-r1,ringkv-cr,ringkv-base,ringkv-base-durable,ringkv-base-r1
TARGETS=echo,relay1,relay2,redis,redis-durable,redis-cluster,ringkv,ringkv-durable,ringkv-cr
SKIP=
RINGKV_DURABLE=both
BASELINE=
HALF=0
HALF_OF=
BUILD=1

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

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
    --targets) TARGETS=$2; shift 2 ;;
    --skip) SKIP=$2; shift 2 ;;
    --ringkv-durable) RINGKV_DURABLE=$2; shift 2 ;;
    --baseline) BASELINE=$2; shift 2 ;;
    --half) HALF=1; shift ;;
    --half-of) HALF_OF=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown option $1" >&2; usage 2 ;;
  esac
done

[ "$TARGETS" = all ] && TARGETS=$ALL_ROWS
if [ -n "$BASELINE" ]; then
  [ -x "$BASELINE" ] || { echo "--baseline $BASELINE is not an executable" >&2; exit 2; }
  for row in ringkv ringkv-durable ringkv-r1; do
    [[ ",$TARGETS," == *",$row,"* ]] && TARGETS="$TARGETS,${row/ringkv/ringkv-base}"
  done
else
  SKIP="$SKIP,ringkv-base,ringkv-base-durable,ringkv-base-r1"
fi
case "$RINGKV_DURABLE" in
  yes) SKIP="$SKIP,ringkv" ;;
  no) SKIP="$SKIP,ringkv-durable" ;;
  both) ;;
  *) echo "--ringkv-durable takes yes, no or both" >&2; exit 2 ;;
esac
for row in ${TARGETS//,/ } ${SKIP//,/ } ${HALF_OF:+$HALF_OF}; do
  [[ ",$ALL_ROWS," == *",$row,"* ]] || { echo "unknown row '$row' (rows: $ALL_ROWS)" >&2; exit 2; }
done
selected() { [[ ",$TARGETS," == *",$1,"* && ",$SKIP," != *",$1,"* ]]; }
ROWS=()
for row in ${ALL_ROWS//,/ }; do selected "$row" && ROWS+=("$row"); done
[ ${#ROWS[@]} -gt 0 ] || { echo "no row selected" >&2; exit 2; }
RINGKV_ROWS=()
for row in "${ROWS[@]}"; do [[ $row == ringkv* ]] && RINGKV_ROWS+=("$row"); done
if [ $HALF -eq 1 ] && [ -z "$HALF_OF" ] && [ ${#RINGKV_ROWS[@]} -eq 0 ]; then
  echo "--half needs a ringkv row, or --half-of ROW" >&2; exit 2
fi
[ -z "$HALF_OF" ] || selected "$HALF_OF" || { echo "--half-of $HALF_OF: that row is not selected" >&2; exit 2; }

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

# Stops the given pids now (to free the server cores for the next row).
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

if [ $BUILD -eq 1 ]; then
  echo "== building (release)"
  (cd "$ROOT" && cargo build --release --quiet -p ringkv-bench -p ringkv-tools)
fi
BENCH="$ROOT/target/release/ringkv-bench"
RINGKV="$ROOT/target/release/ringkv"

if selected redis || selected redis-durable || selected redis-cluster; then
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

# Starts a server under taskset on the server CPUs, in the background, and
# records its pid in $STARTED (and in PIDS for the cleanup).
start_server() { # log command...
  local log=$1; shift
  taskset -c "$SERVER_CPUS" "$@" >"$log" 2>&1 &
  STARTED=$!; PIDS+=("$STARTED")
}

# Runs every selected row once: $1 names the phase (used in file names), the
# rest are extra `run` arguments (a rate for the open-loop phase).
run_targets() {
  local phase=$1; shift
  local COMMON=(--workload "$WL" --records "$RECORDS" --value-size "$VALUE_SIZE" --duration "$DURATION"
                --warmup "$WARMUP" --concurrency "$CONCURRENCY" --pipeline "$PIPELINE" --client-cpus "$CLIENT_CPUS"
                --server-cpus "$SERVER_CPUS" "$@")
  bench() { # name target [extra args...]
    local name=$1 target=$2; shift 2
    echo "== $WL/$phase $name: $target (client on CPUs $CLIENT_CPUS, servers on CPUs $SERVER_CPUS)"
    "$BENCH" run --target "$target" "${COMMON[@]}" --label "$name" --json "$RUN_DIR/$WL-$phase-$name.json" --no-progress "$@"
    RESULTS+=("$RUN_DIR/$WL-$phase-$name.json")
  }

  # The floors: echo direct, behind one relay, behind two. Each row counts
  # every process on its path as the server (--server-endpoints).
  if selected echo || selected relay1 || selected relay2; then
    local floor=()
    start_server "$WORK/echo.log" "$BENCH" echo-server --listen 127.0.0.1:7999; floor+=("$STARTED")
    wait_port 127.0.0.1 7999
    selected echo && bench echo echo://127.0.0.1:7999
    if selected relay1 || selected relay2; then
      start_server "$WORK/relay1.log" "$BENCH" relay-server --listen 127.0.0.1:7998 --upstream 127.0.0.1:7999
      floor+=("$STARTED")
      wait_port 127.0.0.1 7998
      selected relay1 && bench relay1 echo://127.0.0.1:7998 --server-endpoints 127.0.0.1:7999
      if selected relay2; then
        start_server "$WORK/relay2.log" "$BENCH" relay-server --listen 127.0.0.1:7997 --upstream 127.0.0.1:7998
        floor+=("$STARTED")
        wait_port 127.0.0.1 7997
        bench relay2 echo://127.0.0.1:7997 --server-endpoints 127.0.0.1:7998,127.0.0.1:7999
      fi
    fi
    stop "${floor[@]}"
  fi

  redis_row() { # name port appendfsync
    rm -rf "$WORK/$1"; mkdir -p "$WORK/$1"
    start_server "$WORK/$1.log" redis-server --bind 127.0.0.1 --port "$2" --dir "$WORK/$1" --appendonly yes \
      --appendfsync "$3" --save '' --protected-mode no --daemonize no
    local pid=$STARTED
    wait_port 127.0.0.1 "$2"
    bench "$1" "redis://127.0.0.1:$2"
    stop "$pid"
  }
  selected redis && redis_row redis 6390 everysec
  selected redis-durable && redis_row redis-durable 6391 always

  if selected redis-cluster; then
    local cluster=()
    rm -rf "$WORK/cluster"   # a fresh cluster per phase: create refuses nodes that know each other
    for port in 7000 7001 7002 7003 7004 7005; do
      mkdir -p "$WORK/cluster/$port"
      start_server "$WORK/cluster/$port.log" redis-server --bind 127.0.0.1 --port $port --dir "$WORK/cluster/$port" \
        --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 --appendonly yes \
        --appendfsync everysec --save '' --protected-mode no --daemonize no
      cluster+=("$STARTED")
    done
    for port in 7000 7001 7002 7003 7004 7005; do wait_port 127.0.0.1 $port; done
    redis-cli --cluster create 127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002 127.0.0.1:7003 127.0.0.1:7004 \
      127.0.0.1:7005 --cluster-replicas 1 --cluster-yes >"$WORK/cluster-create.log"
    local deadline=$((SECONDS + 60))
    for port in 7000 7001 7002 7003 7004 7005; do
      until [[ "$(redis-cli -p $port cluster info 2>/dev/null)" == *cluster_state:ok* ]]; do
        [ $SECONDS -lt $deadline ] || { echo "redis cluster not ok" >&2; exit 1; }
        sleep 0.2
      done
    done
    # Measured only once every master has its replica (the replicas are
    # configured, and known to the nodes, a few seconds after the slots).
    until [ "$(redis-cli -p 7000 cluster nodes 2>/dev/null | grep -c slave)" -ge 3 ]; do
      [ $SECONDS -lt $deadline ] || { echo "redis cluster replicas not attached" >&2; exit 1; }
      sleep 0.2
    done
    bench redis-cluster redis://127.0.0.1:7000 --cluster
    stop "${cluster[@]}"
  fi

  # A fresh cluster per ringkv row: reloading records into a cluster that
  # holds them would add a sibling to every one.
  ringkv_row() { # name binary [extra run args...]
    local name=$1 RINGKV=$2; shift 2
    rm -rf "$WORK/ringkv"
    if grep -qE '^ +cluster ' <<<"$("$RINGKV" --help)"; then
      # On the server CPUs, like the Redis processes; the OS places the shards.
      start_server "$WORK/$name.log" "$RINGKV" cluster up --nodes 3 --dir "$WORK/ringkv" --no-pin
      local pid=$STARTED
      for ip in 127.0.0.1 127.0.0.2 127.0.0.3; do wait_port $ip 7070 120; done
      NOTE="3-node local cluster (ringkv cluster up, N=3), on CPUs $SERVER_CPUS; requests routed by topology to each key's first replica"
    else
      start_server "$WORK/$name.log" "$RINGKV" server --listen 127.0.0.1:7070 --data-dir "$WORK/ringkv" --shards 1
      local pid=$STARTED
      wait_port 127.0.0.1 7070 120
      NOTE="SINGLE NODE: this ringkv binary has no 'cluster up' yet"
    fi
    # Serving once a write succeeds on every node (the ring may still be forming).
    local deadline=$((SECONDS + 120))
    until "$RINGKV" put --endpoint 127.0.0.1:7070 peers-probe ok >/dev/null 2>&1 &&
          "$RINGKV" put --endpoint 127.0.0.2:7070 peers-probe ok >/dev/null 2>&1 &&
          "$RINGKV" put --endpoint 127.0.0.3:7070 peers-probe ok >/dev/null 2>&1; do
      [ $SECONDS -lt $deadline ] || { echo "ringkv does not accept writes; log:" >&2; tail -20 "$WORK/$name.log" >&2; exit 1; }
      sleep 0.5
    done
    echo "== $name: $NOTE"
    bench "$name" ringkv://127.0.0.1:7070 "$@"
    stop "$pid"
  }
  selected ringkv && ringkv_row ringkv "$RINGKV" --durable no
  selected ringkv-durable && ringkv_row ringkv-durable "$RINGKV" --durable yes
  selected ringkv-r1 && ringkv_row ringkv-r1 "$RINGKV" --durable no --r one
  selected ringkv-cr && ringkv_row ringkv-cr "$RINGKV" --durable no --reads client
  selected ringkv-base && ringkv_row ringkv-base "$BASELINE" --durable no
  selected ringkv-base-durable && ringkv_row ringkv-base-durable "$BASELINE" --durable yes
  selected ringkv-base-r1 && ringkv_row ringkv-base-r1 "$BASELINE" --durable no --r one
  return 0
}

for WL in ${WORKLOAD//,/ }; do
  if [ $HALF -eq 1 ]; then
    run_targets sat
    # Half of the chosen row's saturation: --half-of, else the slowest ringkv
    # row, so every ringkv row stays below its saturation at that rate.
    of=${HALF_OF:-${RINGKV_ROWS[*]}}
    half=$(python3 - "$RUN_DIR" "$WL" $of <<'PY'
import json, os, sys
run, wl, rows = sys.argv[1], sys.argv[2], sys.argv[3:]
sats = [json.load(open(p))['ops_per_sec'] for p in (os.path.join(run, f'{wl}-sat-{r}.json') for r in rows) if os.path.exists(p)]
print(max(1, int(min(sats) / 2)) if sats else '')
PY
)
    [ -n "$half" ] || { echo "no saturation result of $of for workload $WL" >&2; exit 1; }
    echo "== $WL: half of the saturation of ${of// /, or } is $half ops/s; open loop at that rate for every row"
    run_targets half --rate "$half"
  else
    run_targets run ${RATE:+--rate "$RATE"}
  fi
done

[ ${#RESULTS[@]} -gt 0 ] || { echo "no row ran" >&2; exit 2; }
if [ $HALF -eq 1 ]; then
  python3 - "$RUN_DIR" "$WORKLOAD" "${ROWS[@]}" >"$RUN_DIR/summary.md" <<'PY'
import json, os, sys
run, workloads, rows = sys.argv[1], sys.argv[2].split(','), sys.argv[3:]
def load(wl, phase, name):
    p = os.path.join(run, f'{wl}-{phase}-{name}.json')
    return json.load(open(p)) if os.path.exists(p) else None
def pct(r, key):
    return (r.get('all') or {}).get(key)
def num(v, fmt='.1f'):
    return '-' if v is None else format(v, fmt)
def share(v):
    return '-' if v is None else f'{100 * v:.0f}%'
print('Saturation (closed loop), then latency at 50% load (open loop at half of ringkv\'s saturation).')
print('server CPU: the CPU time of the server processes found (pids); cores busy: the server CPUs\' busy share')
print('and busy time per operation from /proc/stat, at saturation.')
print()
print('| workload | row | saturation ops/s | p50 us @50% | p99 us @50% | p99.9 us @50% | client CPU us/op | '
      'server CPU us/op | server pids | cores busy | cores busy us/op |')
print('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
warnings = []
for wl in workloads:
    for name in rows:
        s, h = load(wl, 'sat', name), load(wl, 'half', name)
        if not s or not h:
            continue
        print(f"| {wl.upper()} | {name} | {s['ops_per_sec']:.0f} | {num(pct(h, 'p50_us'), '.0f')} | "
              f"{num(pct(h, 'p99_us'), '.0f')} | {num(pct(h, 'p999_us'), '.0f')} | {s.get('client_cpu_us_per_op', 0):.1f} | "
              f"{num(s.get('server_cpu_us_per_op'))} | {len(s.get('server_pids') or [])} | "
              f"{share(s.get('server_cores_busy_share'))} | {num(s.get('server_cores_busy_us_per_op'))} |")
        for phase, r in (('sat', s), ('half', h)):
            warnings += [f'{wl.upper()} {name} ({phase}): {w}' for w in r.get('warnings') or []]
print()
peers = ['echo', 'relay1', 'relay2', 'redis', 'redis-durable', 'redis-cluster']
print('Each ringkv row against the floors and the Redis rows (ringkv / other; throughput: higher is better;')
print('latency and core time per operation: lower is better):')
print()
print('| workload | row | sat / echo | sat / relay1 | sat / relay2 | sat / redis | sat / redis-durable | '
      'sat / redis-cluster | p99 / redis-cluster | p99.9 / redis-cluster | core us/op / redis-cluster |')
print('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
def ratio(a, b):
    return f'{a / b:.2f}' if a is not None and b else '-'
for wl in workloads:
    for name in [r for r in rows if r.startswith('ringkv')]:
        rs, rh = load(wl, 'sat', name), load(wl, 'half', name)
        if not rs or not rh:
            continue
        sat = lambda p: ratio(rs['ops_per_sec'], (load(wl, 'sat', p) or {}).get('ops_per_sec'))
        ch = load(wl, 'half', 'redis-cluster') or {}
        cs = load(wl, 'sat', 'redis-cluster') or {}
        print(f"| {wl.upper()} | {name} | {' | '.join(sat(p) for p in peers)} | "
              f"{ratio(pct(rh, 'p99_us'), pct(ch, 'p99_us') if ch else None)} | "
              f"{ratio(pct(rh, 'p999_us'), pct(ch, 'p999_us') if ch else None)} | "
              f"{ratio(rs.get('server_cores_busy_us_per_op'), cs.get('server_cores_busy_us_per_op'))} |")
if warnings:
    print()
    print('Warnings:')
    print()
    for w in warnings:
        print(f'- {w}')
PY
  cat "$RUN_DIR/summary.md"
fi
{
  echo "# ringkv and peers: workload(s) $WORKLOAD, $RECORDS records, values $VALUE_SIZE B, $CONCURRENCY conn x pipeline $PIPELINE${RATE:+, open loop at $RATE ops/s}"
  echo
  echo "rows: ${ROWS[*]}. Client pinned to CPUs $CLIENT_CPUS; every server under taskset on CPUs $SERVER_CPUS."
  echo "redis: appendfsync everysec; redis-durable: appendfsync always; redis-cluster: everysec."
  echo "ringkv: --durable no; ringkv-durable: --durable yes; ringkv-r1: --durable no --r one; ringkv-cr: --durable no --reads client."
  [ -n "$BASELINE" ] && echo "ringkv-base*: the same rows with the baseline binary $BASELINE."
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
echo "results, .hgrm files and plots in $RUN_DIR (latency plot, a panel per workload and load: $RUN_DIR/latency.svg)"
