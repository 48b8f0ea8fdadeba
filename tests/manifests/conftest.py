"""Shared helpers: the operator binary and YAML loading."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = os.environ.get("SWITCHBOARD_OPERATOR_BIN", str(ROOT / "target" / "debug" / "switchboard-operator"))
# The oldest and newest Kubernetes versions Switchboard supports.
K8S_VERSIONS = ["1.33", "1.37"]


def render(*files):
    out = subprocess.run([OPERATOR, "render", *map(str, files)], check=True, capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def crds():
    import yaml_loader
    return {d["spec"]["names"]["kind"]: d for d in yaml_loader.load_all(ROOT / "crds" / "switchboard.dev.yaml")}
