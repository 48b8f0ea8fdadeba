"""Turn the load generator's JSON lines into docs/benchmarks.md."""

import datetime
import json
import os
import platform
import subprocess
import sys


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
mem = sh("free -g | awk '/Mem/{print $2}'")
print("# Benchmarks\n")
print("Written by `./bench/run.sh` (release build, `bench/` load generator); do not edit by hand.\n")
print(f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
print(f"- machine: {os.cpu_count()} cores ({cpu}), {mem} GiB RAM, {platform.system()} {platform.release()}")
print(f"- toolchain: {sh('rustc --version')}")
print(f"- gateway: {sh('git rev-parse --short HEAD')} (embedded mode); server and load generator share the same cores\n")
print("| scenario | s | conns | topics | pub/s | deliveries/s | lost | dup | p50 ms | p99 ms | p99.9 ms | max ms | KiB/idle conn | server CPU s | loadgen CPU s |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
fmt = lambda v, d=1: "–" if v is None else f"{v:,.{d}f}"
for r in rows:
    lat = r["latency_ms"]
    print(f"| {r['scenario']} | {r['seconds']} | {r['connections']:,} | {r['topics']} | {r['rate']} | {fmt(r['deliveries_per_second'] if r['rate'] else None, 0)} | "
          f"{r['lost']} | {r['duplicates']} | {fmt(lat['p50'])} | {fmt(lat['p99'])} | {fmt(lat['p999'])} | {fmt(lat['max'])} | "
          f"{fmt(r['kib_per_idle_connection'])} | {fmt(r['server_cpu_seconds'], 2)} | {fmt(r['loadgen_cpu_seconds'], 2)} |")

by = {r["scenario"]: r for r in rows}
base = by.get("fanout-5k-1topic")
print("\n## Tracing cost\n")
for name in ["fanout-5k-1topic-otlp-ratio0", "fanout-5k-1topic-otlp-ratio0.1"]:
    r = by.get(name)
    if base and r and base["server_cpu_seconds"] and r["server_cpu_seconds"]:
        d = 100 * (r["server_cpu_seconds"] - base["server_cpu_seconds"]) / base["server_cpu_seconds"]
        print(f"- `{name}`: server CPU {r['server_cpu_seconds']:.2f} s vs {base['server_cpu_seconds']:.2f} s without export "
              f"({d:+.1f}%); deliveries/s {r['deliveries_per_second']:,.0f} vs {base['deliveries_per_second']:,.0f}; "
              f"p99 {fmt(r['latency_ms']['p99'])} ms vs {fmt(base['latency_ms']['p99'])} ms.")
print("""
The fan-out scenarios publish at a fixed rate, so deliveries/s is the offered
load when nothing is lost; the tracing comparison therefore reads server CPU
seconds for the same work (lower is better) and latency.

## Reproduce

```sh
./bench/run.sh            # about 2 minutes; QUICK=1 for 5-second runs
```

## Not measured yet (issue 7)

Peers (nats-server's WebSocket listener, Socket.IO) in the same run, 100k
connections over several source addresses, the max-throughput ramp, the
reconnect storm and cluster mode are not implemented in the load generator
yet; this table is Switchboard embedded only.
""")
