"""The dashboard and alert rules only use metrics the gateway and operator
actually expose (names read from their /metrics and the docs)."""

import json
import re

import yaml

from conftest import ROOT

OBS = ROOT / "deploy" / "observability"
DOC = (ROOT / "docs" / "observability.md").read_text()


def metric_names(expr):
    names = set(re.findall(r"\b(switchboard_[a-z_]+)", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def documented(name):
    base = re.sub(r"_total$", "", name)
    return name in DOC or base in DOC


def test_alert_rules_are_well_formed_and_use_documented_metrics():
    rules = yaml.safe_load((OBS / "alerts.yaml").read_text())
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
            names |= metric_names(rule["expr"])
    assert names and all(documented(n) for n in names), [n for n in names if not documented(n)]
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"SwitchboardConnectionsNearLimit", "SwitchboardDeliveryLatencyHigh", "SwitchboardSlowConsumerDrops",
            "SwitchboardNatsDisconnected", "SwitchboardReconcileFailures"} <= alerts


def test_dashboard_uses_documented_metrics():
    dash = json.loads((OBS / "grafana-dashboard.json").read_text())
    names = set()
    for p in dash["panels"]:
        for t in p["targets"]:
            names |= metric_names(t["expr"])
    assert len(names) >= 10
    assert all(documented(n) for n in names), [n for n in names if not documented(n)]
