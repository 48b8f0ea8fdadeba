"""Render a chart with the real Helm engine (helm-python-sdk) and print every
object as one JSON list. Used by the operator's Rust tests, whose fake API
server authorizes requests with the RBAC this chart renders.

    python tests/chart/render.py [--chart charts/switchboard] [--values FILE]... [--set-json JSON] [--namespace NS]
"""

import argparse
import json
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]


def merge(base, extra):
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def render(chart, values, namespace="switchboard", release="sb"):
    out = helm.Chart.load(str(chart)).render(values or {}, name=release, namespace=namespace)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chart", default=str(ROOT / "charts" / "switchboard"))
    parser.add_argument("--values", action="append", default=[])
    parser.add_argument("--set-json", default="{}", help="values merged last, as JSON")
    parser.add_argument("--namespace", default="switchboard")
    parser.add_argument("--release", default="sb")
    args = parser.parse_args()
    values = {}
    for path in args.values:
        merge(values, yaml.safe_load(Path(path).read_text()) or {})
    merge(values, json.loads(args.set_json))
    print(json.dumps(render(args.chart, values, args.namespace, args.release)))


if __name__ == "__main__":
    main()
