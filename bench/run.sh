#!/usr/bin/env bash
# Switchboard's benchmark: builds release binaries, runs each scenario
# against a fresh gateway process, and writes docs/benchmarks.md from the
# load generator's JSON output (numbers are never typed by hand).
#
#   ./bench/run.sh            # all scenarios
#   QUICK=1 ./bench/run.sh    # shorter runs
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="$root/target/bench"
mkdir -p "$out"
: > "$out/results.jsonl"
ulimit -n "$(ulimit -Hn)" || true
cargo build --release --locked -p switchboard-gateway -p switchboard-bench
gw="$root/target/release/switchboard"
lg="$root/target/release/loadgen"
secs=${QUICK:+5}; secs=${secs:-15}
port=18700

run() { # name, gateway env (space-separated k=v), loadgen args...
  local name=$1 envs=$2; shift 2
  port=$((port + 1))
  env SWITCHBOARD_HS256_SECRET=bench-secret RUST_LOG=warn $envs "$gw" --listen 127.0.0.1:$port >"$out/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  "$lg" --url "http://127.0.0.1:$port" --server-pid "$pid" --scenario "$name" "$@" | tee -a "$out/results.jsonl"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

"$lg" --otlp-sink 4399 2>"$out/otlp-sink.log" &
sink=$!
trap 'kill $sink 2>/dev/null || true' EXIT

run idle-10k "" --connections 10000 --topics 100 --rate 0 --seconds 1
run fanout-5k-1topic "" --connections 5000 --topics 1 --rate 20 --seconds "$secs"
run fanout-10k-1000topics "" --connections 10000 --topics 1000 --rate 2000 --seconds "$secs"
# Tracing cost: the same fan-out with trace export to an OTLP sink.
run fanout-5k-1topic-otlp-ratio0 "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4399 OTEL_TRACES_SAMPLER_ARG=0" \
  --connections 5000 --topics 1 --rate 20 --seconds "$secs"
run fanout-5k-1topic-otlp-ratio0.1 "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4399 OTEL_TRACES_SAMPLER_ARG=0.1" \
  --connections 5000 --topics 1 --rate 20 --seconds "$secs"

python3 bench/report.py "$out/results.jsonl" > docs/benchmarks.md
echo "wrote docs/benchmarks.md"
