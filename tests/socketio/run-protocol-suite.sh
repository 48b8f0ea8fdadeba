#!/usr/bin/env bash
# The official Socket.IO protocol test suite (vendored in protocol-suite/)
# against the gateway's Engine.IO/Socket.IO layers in the suite's fixture
# configuration (gateway/examples/socketio_conformance.rs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
fixture="$root/target/debug/examples/socketio_conformance"
[ -x "$fixture" ] || cargo build --quiet --locked -p switchboard-gateway --example socketio_conformance
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$fixture" "$port" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
cd "$here/protocol-suite"
[ -d node_modules ] || npm ci --no-audit --no-fund --loglevel=error
sed "s#http://localhost:3000#http://127.0.0.1:$port#" test-suite.js > .generated-test-suite.js
npx mocha --forbid-only --forbid-pending .generated-test-suite.js
