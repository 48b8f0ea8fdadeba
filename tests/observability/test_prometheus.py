"""The gateway's metrics as a real Prometheus sees them.

A real nats-server (JetStream), the real gateway binary in cluster mode with
traces on, and Debian's real Prometheus scraping the gateway's admin port
(with exemplar storage). A scenario runs through real WebSocket and HTTP
clients; then the series, their values and their types are read back
through Prometheus's HTTP API, every Grafana dashboard query over gateway
metrics must return data (the operator's panels are checked the same way in
operator/tests/prometheus.rs), the alert rules load and evaluate without
error, and `promtool` checks the exposition and unit-tests every alert.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SWITCHBOARD_BIN", str(ROOT / "target" / "debug" / "switchboard"))
NATS = os.environ.get("NATS_SERVER_BIN", "nats-server")
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
ALERTS = ROOT / "deploy" / "observability" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "observability" / "alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "observability" / "grafana-dashboard.json"
ADAPTER = ROOT / "deploy" / "observability" / "prometheus-adapter-values.yaml"
SECRET = "prometheus-test-secret"
PUBLISHED = 40        # events published to a subscribed topic
UNROUTED = 5          # events published where nobody listens


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what, check, timeout=60, describe=None):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f": {describe()}" if describe else ""))
        time.sleep(0.2)


def http_json(url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.load(r)


def token(tenant, scope):
    return subprocess.run([BIN, "token", "--tenant", tenant, "--scope", scope, "--secret", SECRET],
                          check=True, capture_output=True, text=True).stdout.strip()


class OtlpSink(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports (the gateway samples, so exemplars exist)."""
    exports = 0

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        OtlpSink.exports += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom")
    procs = []
    otlp = ThreadingHTTPServer(("127.0.0.1", 0), OtlpSink)
    threading.Thread(target=otlp.serve_forever, daemon=True).start()
    try:
        nats_port = free_port()
        procs.append(subprocess.Popen([NATS, "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(tmp / "js")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        port, admin = free_port(), free_port()
        policy = tmp / "policy.yaml"
        policy.write_text("tenants:\n  acme:\n    subscribe: [{pattern: \">\"}]\n    publish: [{pattern: \">\"}]\n")
        config = tmp / "gateway.yaml"
        config.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin}",
            "region": "eu",
            "auth": {"hs256_secret": SECRET},
            "policy_file": str(policy),
            "policy_reload_seconds": 1,
            "nats": {"urls": [f"nats://127.0.0.1:{nats_port}"], "regions": ["eu"]},
            "telemetry": {"otlp_endpoint": f"http://127.0.0.1:{otlp.server_address[1]}",
                          "otlp_protocol": "http_protobuf", "sampling_ratio": 1.0},
        }))
        log = open(tmp / "gateway.log", "w")
        procs.append(subprocess.Popen([BIN, "--config", str(config)], stdout=subprocess.DEVNULL, stderr=log,
                                      env=dict(os.environ, RUST_LOG="warn", OTEL_BSP_SCHEDULE_DELAY="200")))

        def ready():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False
        until("gateway ready", ready)

        prom_port = free_port()
        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{
                "job_name": "switchboard-gateway",
                "static_configs": [{"targets": [f"127.0.0.1:{admin}"], "labels": {"pod": "gw-0"}}],
            }],
        }))
        procs.append(subprocess.Popen([
            PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--enable-feature=exemplar-storage",
        ], stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "w")))
        prom = f"http://127.0.0.1:{prom_port}"

        def prom_ready():
            try:
                with urllib.request.urlopen(f"{prom}/-/ready", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False
        until("prometheus ready", prom_ready)
        yield {"http": f"http://127.0.0.1:{port}", "ws": f"ws://127.0.0.1:{port}", "admin": f"http://127.0.0.1:{admin}",
               "prom": prom, "policy": policy, "otlp": OtlpSink}
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        otlp.shutdown()


def publish(stack, topic, n):
    body = json.dumps({"event_type": topic, "data": {"n": n}}).encode()
    status, reply = http_json(f"{stack['http']}/api/realtime/publish/", data=body,
                              headers={"Authorization": f"Bearer {token('acme', 'publish')}",
                                       "Content-Type": "application/json"})
    assert status == 201
    return reply["event_id"]


def query(stack, promql):
    url = f"{stack['prom']}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    status, body = http_json(url)
    assert status == 200 and body["status"] == "success", body
    return body["data"]["result"]


def value(stack, promql):
    result = query(stack, promql)
    return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def scenario(stack):
    """Connections, subscriptions, deliveries, a drop, a rejection, a resume,
    a disconnect and a policy reload; returns once Prometheus has scraped it."""
    sub = token("acme", "subscribe")
    ws = connect(f"{stack['ws']}/ws?token={sub}")
    assert json.loads(ws.recv(timeout=10))["type"] == "connection.established"
    ws.send(json.dumps({"type": "subscribe", "topics": ["deal.*"]}))
    assert json.loads(ws.recv(timeout=10))["type"] == "subscription.confirmed"
    first = None
    # Spread over a few scrapes so that rates have two points.
    for n in range(PUBLISHED):
        event_id = publish(stack, "deal.updated", n)
        first = first or event_id
        if n % 10 == 9:
            time.sleep(1.2)
    for n in range(UNROUTED):
        publish(stack, "nobody.listens", n)
    received = 0
    while received < PUBLISHED:
        if json.loads(ws.recv(timeout=10))["type"] == "event":
            received += 1
    ws.close()
    # A bad token is refused (rejected + auth error).
    bad = connect(f"{stack['ws']}/ws?token=not-a-token")
    try:
        bad.recv(timeout=10)
    except Exception:  # noqa: BLE001 - the close is the answer
        pass
    # A resume from the first event replays the rest.
    again = connect(f"{stack['ws']}/ws?token={sub}&cursor={first}")
    assert json.loads(again.recv(timeout=10))["type"] == "connection.established"
    again.send(json.dumps({"type": "subscribe", "topics": ["deal.*"]}))
    replayed = 0
    while replayed < PUBLISHED - 1:
        if json.loads(again.recv(timeout=10))["type"] == "event":
            replayed += 1
    # A policy change is picked up.
    stack["policy"].write_text(stack["policy"].read_text() + "    limits: {messages_per_minute: 1000}\n")
    until("policy reload scraped", lambda: (value(stack, 'sum(switchboard_policy_reloads_total{result="ok"})') or 0) >= 1)
    scraped = ["sum(switchboard_resume_total)", "sum(switchboard_websocket_disconnected_total)",
               "switchboard_event_published_total"]
    until("scenario scraped", lambda: [value(stack, q) for q in scraped] == [1, 1, PUBLISHED + UNROUTED],
          describe=lambda: {q: query(stack, q) for q in scraped})
    # Keep events flowing while the dashboard is queried, so rates are not 0.
    stop = threading.Event()

    def keep_publishing():
        n = 0
        while not stop.wait(0.3):
            publish(stack, "deal.tick", n)
            n += 1
    t = threading.Thread(target=keep_publishing, daemon=True)
    t.start()
    time.sleep(3)
    yield {"ws": again}
    stop.set()
    t.join()
    again.close()


def test_series_have_the_scenario_values(stack, scenario):
    exact = {
        'switchboard_websocket_connected_total{pod="gw-0"}': 2,
        # Cluster mode: NATS routes by interest, so an event nobody subscribed
        # to never reaches the gateway (the series exists, at 0).
        'switchboard_event_dropped_total{reason="no_subscribers"}': 0,
        'switchboard_event_dropped_total{reason="slow_consumer"}': 0,
        'switchboard_websocket_disconnected_total{reason="client"}': 1,
        'switchboard_errors_total{kind="auth"}': 1,
        'switchboard_nats_connected': 1,
        'switchboard_websocket_active': 1,
    }
    for promql, want in exact.items():
        assert value(stack, promql) == want, promql
    # Published grows with the background ticks; delivered covers the
    # scenario's events, the replay and the ticks so far.
    assert value(stack, "switchboard_event_published_total") >= PUBLISHED + UNROUTED
    assert value(stack, "switchboard_event_delivered_total") >= 2 * PUBLISHED - 1
    assert value(stack, 'switchboard_delivery_latency_seconds_count') >= PUBLISHED
    assert value(stack, 'sum(switchboard_websocket_rejected_total)') >= 1
    assert value(stack, 'sum(switchboard_resume_total)') >= 1


def test_metadata_reports_the_right_types(stack, scenario):
    status, body = http_json(f"{stack['prom']}/api/v1/metadata")
    meta = {name: entries[0]["type"] for name, entries in body["data"].items() if name.startswith("switchboard_")}
    want = {
        "switchboard_websocket_connected": "counter",
        "switchboard_event_published": "counter",
        "switchboard_event_delivered": "counter",
        "switchboard_event_dropped": "counter",
        "switchboard_websocket_active": "gauge",
        "switchboard_nats_connected": "gauge",
        "switchboard_delivery_latency_seconds": "histogram",
        "switchboard_fanout_duration_seconds": "histogram",
    }
    for name, kind in want.items():
        assert meta.get(name) == kind, (name, meta.get(name))
    assert "unknown" not in meta.values(), meta


def test_exemplars_link_latency_to_sampled_traces(stack, scenario):
    end = time.time()
    url = f"{stack['prom']}/api/v1/query_exemplars?" + urllib.parse.urlencode(
        {"query": "switchboard_delivery_latency_seconds_bucket", "start": end - 600, "end": end})
    ids = until("exemplars stored", lambda: [e["labels"]["trace_id"]
                                            for series in http_json(url)[1]["data"] for e in series["exemplars"]])
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    until("spans exported", lambda: stack["otlp"].exports > 0)


def test_the_autoscaling_metric_counts_websocket_and_sse_connections(stack, scenario):
    """The prometheus-adapter rule shipped for `targetConnectionsPerPod`,
    with the adapter's template filled in as it fills it for one pod."""
    [rule] = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == "switchboard_connections"
    series = rule["seriesQuery"].replace('namespace!="",', "")
    assert query(stack, series), f"the adapter's series query finds nothing: {series}"
    promql = (rule["metricsQuery"].replace("<<.GroupBy>>", "pod")
              .replace("<<.LabelMatchers>>", 'pod="gw-0"'))
    ws = value(stack, 'switchboard_websocket_active{pod="gw-0"}')
    assert ws == 1
    # Open an SSE stream as well: the metric is both transports.
    sub = token("acme", "subscribe")
    stream = urllib.request.urlopen(f"{stack['http']}/api/realtime/sse/?topics=deal.*&token={sub}", timeout=10)
    try:
        stream.readline()
        until("SSE stream counted", lambda: value(stack, promql) == ws + 1, timeout=30,
              describe=lambda: query(stack, promql))
        [result] = query(stack, promql)
        assert result["metric"] == {"pod": "gw-0"}, result
    finally:
        stream.close()


def dashboard_queries():
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize("expr", [e for e in dashboard_queries() if "switchboard_operator_" not in e])
def test_every_gateway_dashboard_query_returns_data(stack, scenario, expr):
    result = until(f"data for {expr}", lambda: query(stack, expr), timeout=20)
    assert result


def test_alert_rules_load_and_evaluate_without_error(stack, scenario):
    def groups():
        return http_json(f"{stack['prom']}/api/v1/rules")[1]["data"]["groups"]
    rules = until("rules evaluated", lambda: [r for g in groups() for r in g["rules"]
                                              if r.get("lastEvaluation", "").startswith("20")] or None)
    alerts = yaml.safe_load(ALERTS.read_text())
    assert {r["name"] for r in rules} == {r["alert"] for g in alerts["groups"] for r in g["rules"]}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # A healthy gateway in cluster mode fires nothing.
    firing = [r["name"] for r in rules if r["state"] != "inactive" and not r["name"].startswith("SwitchboardOperator")
              and r["name"] != "SwitchboardReconcileFailures"]
    assert firing == []


def promtool(*args, stdin=None):
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True)


def test_promtool_accepts_the_prometheus_text_exposition(stack, scenario):
    with urllib.request.urlopen(f"{stack['admin']}/metrics", timeout=5) as r:
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = r.read().decode()
    out = promtool("check", "metrics", stdin=text)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out


def test_promtool_checks_the_rules_and_unit_tests_every_alert():
    out = promtool("check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    out = promtool("test", "rules", str(ALERT_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    # Every alert has a case where it fires and one where it stays quiet.
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    fired, quiet = set(), set()
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fired == alerts, alerts - fired
    assert quiet == alerts, alerts - quiet
