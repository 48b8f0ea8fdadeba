"""Load YAML documents (PyYAML comes with kubernetes-validate)."""

import yaml


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]
