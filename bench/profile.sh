#!/usr/bin/env bash
# Profile the gateway under one benchmark load with perf (CPU) and heaptrack
# (allocations, when installed). Writes target/bench/profile-*.txt.
#
#   ./bench/profile.sh                         # 2,000 clients, 1 topic, 500 publishes/s
#   ./bench/profile.sh --connections 5000 --topics 1 --rate 20
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench
mkdir -p "$out"
cargo build --release --locked -p switchboard-gateway -p switchboard-bench
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--connections 2000 --topics 1 --rate 500 --seconds 8)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

SWITCHBOARD_HS256_SECRET=bench-secret RUST_LOG=warn target/release/switchboard --listen 127.0.0.1:"$port" --admin-listen off &
gw=$!
trap 'kill $gw 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/api/realtime/health/" >/dev/null && break; sleep 0.1; done
perf record -F 999 -g -o "$out/perf.data" -p "$gw" &
perf_pid=$!
target/release/loadgen --url "http://127.0.0.1:$port" --server-pid "$gw" --settle 0 "${args[@]}" > "$out/profile-load.json"
kill -INT "$perf_pid"; wait "$perf_pid" || true
perf report -i "$out/perf.data" --no-children --sort symbol --stdio 2>/dev/null | grep -E '^ +[0-9.]+%' | head -40 > "$out/profile-cpu.txt"
kill "$gw"; wait "$gw" 2>/dev/null || true

if command -v heaptrack >/dev/null; then
  # Allocations held per idle connection: 2,000 clients connect, then the gateway stops.
  SWITCHBOARD_HS256_SECRET=bench-secret RUST_LOG=warn heaptrack -o "$out/heap" \
    target/release/switchboard --listen 127.0.0.1:"$port" --admin-listen off >/dev/null 2>&1 &
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/api/realtime/health/" >/dev/null && break; sleep 0.2; done
  target/release/loadgen --url "http://127.0.0.1:$port" --connections 2000 --topics 100 --settle 1 >/dev/null
  pkill -INT -f "switchboard --listen 127.0.0.1:$port" || true
  sleep 3
  heaptrack_print -f "$out"/heap*.zst --print-peaks 1 -n 15 -s 0 2>/dev/null > "$out/profile-heap.txt" || true
fi
echo "wrote $out/profile-cpu.txt (and profile-heap.txt with heaptrack)" >&2
