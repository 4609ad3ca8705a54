#!/usr/bin/env bash
# Storage benchmarks of one shard, each beside the floor it is judged by,
# measured in the same run (docs/BENCHMARKS.md):
#   - durable 1 KiB writes (group commit) vs fio O_DIRECT writes + fdatasync
#     at the same bytes per fdatasync, on the same disk;
#   - restart with hint files vs a full log replay (10M keys by default);
#   - index bytes per 16-byte key;
#   - get p99 with compaction running vs idle.
# Usage: bench/storage.sh [--dir DIR] [--keys N] [--seconds S] [--writers W]
# DIR must be on the disk to measure (default: ./ringkv-bench-storage); it is
# emptied first and removed at the end. Needs fio (installed from Debian
# when missing and run as root).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/ringkv-bench-storage"
keys=10000000
seconds=10
writers=32
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --keys) keys=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --writers) writers=$2; shift 2 ;;
    *) echo "storage.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if ! command -v fio >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio >/dev/null; }
  else
    echo "storage.sh: fio is missing (apt-get install fio)" >&2
    exit 2
  fi
fi
trap 'rm -rf "$dir"' EXIT
cd "$root"
cargo bench -q -p ringkv-engine --bench storage --no-run 2>/dev/null
bench() { cargo bench -q -p ringkv-engine --bench storage -- "$@" 2>/dev/null; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }

echo "== index memory"
bench index-memory --keys 1000000
bench index-memory --keys "$keys"

echo "== durable writes vs fio"
out=$(bench durable-writes --dir "$dir/writes" --writers "$writers" --seconds "$seconds")
echo "$out"
per_flush=$(echo "$out" | grep '^result' | field bytes_per_flush)
ours=$(echo "$out" | grep '^result' | field mib_per_sec)
# fio writes whole 4 KiB-aligned blocks of about the same size, one
# O_DIRECT write then one fdatasync at a time, like the flusher.
bs=$(( (per_flush + 4095) / 4096 * 4096 ))
mkdir -p "$dir/fio"
fio_out=$(fio --name=floor --directory="$dir/fio" --size=4g --rw=write --bs="$bs" --direct=1 --fdatasync=1 \
  --ioengine=psync --time_based --runtime="$seconds" --output-format=terse --terse-version=3)
# terse v3: field 48 is the write bandwidth in KiB/s.
fio_kib=$(echo "$fio_out" | awk -F';' '{print $48}')
fio_mib=$(awk -v k="$fio_kib" 'BEGIN {printf "%.2f", k / 1024}')
echo "fio: O_DIRECT writes of $bs bytes + fdatasync each: $fio_mib MiB/s"
awk -v a="$ours" -v b="$fio_mib" 'BEGIN {printf "result durable-vs-fio ringkv_mib=%s fio_mib=%s ratio=%.2f\n", a, b, a / b}'
rm -rf "$dir/fio" "$dir/writes"

echo "== restart: hint files vs full replay"
bench restart --dir "$dir/restart" --keys "$keys"
rm -rf "$dir/restart"

echo "== get latency: compaction running vs idle"
bench compaction-latency --dir "$dir/compaction" --seconds "$seconds"
