"""Start the real gateway binary on a free loopback port for the Python tests."""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SWITCHBOARD_BIN", str(ROOT / "target" / "debug" / "switchboard"))
SECRET = "python-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    def __init__(self, port: int):
        self.port = port
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"

    def token(self, tenant: str, scope: str = "subscribe") -> str:
        out = subprocess.run(
            [BIN, "token", "--tenant", tenant, "--scope", scope, "--secret", SECRET],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def publish(self, tenant: str, event_type: str, data: dict) -> dict:
        body = json.dumps({"event_type": event_type, "data": data}).encode()
        req = urllib.request.Request(
            f"{self.http}/api/realtime/publish/", data=body, method="POST",
            headers={"Authorization": f"Bearer {self.token(tenant, 'publish')}",
                     "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 201
            return json.load(r)

    def poll(self, token: str, query: str) -> dict:
        req = urllib.request.Request(f"{self.http}/api/realtime/poll/?{query}",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=70) as r:
            return json.load(r)


@pytest.fixture(scope="session")
def gateway():
    port = free_port()
    env = dict(os.environ, SWITCHBOARD_HS256_SECRET=SECRET, RUST_LOG="warn")
    admin_port = free_port()
    proc = subprocess.Popen([BIN, "--listen", f"127.0.0.1:{port}",
                             "--admin-listen", f"127.0.0.1:{admin_port}"], env=env)
    gw = Gateway(port)
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("gateway did not become ready")
        time.sleep(0.05)
    yield gw
    proc.terminate()
    proc.wait(timeout=15)
