"""What one "own" history read costs nats-server (docs/scaling.md, "Known
limit"): create an ephemeral pull consumer filtered to one topic from a
cursor, fetch, delete, as the gateway does for a cursor outside the shared
recent range; by stream size and by how far behind the head the cursor is.

Usage: python3 -m venv v && v/bin/pip install nats-py &&
       v/bin/python bench/jetstream_read_cost.py [nats-server binary]
"""
import asyncio, time, subprocess, shutil, socket, os, sys, tempfile
import nats
from nats.js.api import ConsumerConfig, DeliverPolicy, AckPolicy, StreamConfig

def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().split(")")[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

async def main():
    port = free(); d = tempfile.mkdtemp(prefix="js-read-cost-")
    nats_bin = sys.argv[1] if len(sys.argv) > 1 else "nats-server"
    srv = subprocess.Popen([nats_bin, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", d], stderr=subprocess.DEVNULL)
    await asyncio.sleep(1)
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="S", subjects=["ev.>"]))
    payload = b'{"data":{"seq":1,"step":0,"sent":1},"region":"bench"}' + b" " * 50
    total = 0
    for target in (10000, 75000, 150000):
        while total < target:
            await asyncio.gather(*[js.publish(f"ev.t{(total + i) % 1002}", payload) for i in range(500)]); total += 500
        for behind in (2000, 8000, 30000):
            n = 40; c0 = cpu(srv.pid); t0 = time.perf_counter()
            for k in range(n):
                ci = await js.add_consumer("S", ConsumerConfig(filter_subject=f"ev.t{k % 1002}", deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, total - behind), ack_policy=AckPolicy.NONE, mem_storage=True, inactive_threshold=30.0))
                sub = await js.pull_subscribe_bind(durable=ci.name, stream="S")
                try:
                    msgs = await sub.fetch(256, timeout=0.5)
                except Exception:
                    msgs = []
                await sub.unsubscribe()
                await js.delete_consumer("S", ci.name)
            dc = cpu(srv.pid) - c0; dt = (time.perf_counter() - t0) / n
            print(f"stream {total:>6}, cursor {behind:>5} behind: {dt*1000:.1f} ms per read, nats-server CPU {dc/n*1000:.2f} ms per read", flush=True)
    await nc.close(); srv.terminate(); shutil.rmtree(d, ignore_errors=True)

asyncio.run(main())
