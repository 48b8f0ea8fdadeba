"""Every object the operator produces is valid for the oldest and newest
Kubernetes versions we support (kubernetes-validate, strict), and every
example custom resource validates against the generated CRD schema."""

import copy

import jsonschema
import kubernetes_validate
import pytest

import yaml_loader
from conftest import K8S_VERSIONS, ROOT, render

EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_operator_output_is_valid_kubernetes(version):
    objects = render(*EXAMPLES)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ServiceAccount", "ConfigMap", "Deployment", "Service",
                            "PodDisruptionBudget", "HorizontalPodAutoscaler"])
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crds_are_valid_kubernetes(version, crds):
    for crd in crds.values():
        kubernetes_validate.validate(crd, version, strict=True)


def openapi_to_jsonschema(schema):
    """CRD schemas say `nullable: true`; JSON Schema says `type: [x, "null"]`."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.pop("nullable", False) and "type" in node:
                node["type"] = [node["type"], "null"]
            for key in [k for k in node if k.startswith("x-kubernetes")]:
                node.pop(key)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(s)
    return s


def schema_of(crd):
    return openapi_to_jsonschema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_examples_are_valid(crds):
    """Custom resources against the generated CRD schema; built-in kinds
    with kubernetes-validate."""
    seen = 0
    for path in EXAMPLES:
        for doc in yaml_loader.load_all(path):
            if doc["kind"] in crds:
                jsonschema.validate(doc, schema_of(crds[doc["kind"]]))
            else:
                for version in K8S_VERSIONS:
                    kubernetes_validate.validate(doc, version, strict=True)
            seen += 1
    assert seen >= 4


def test_the_schema_rejects_bad_custom_resources(crds):
    gw = schema_of(crds["RealtimeGateway"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apiVersion": "switchboard.dev/v1alpha1", "kind": "RealtimeGateway",
                             "metadata": {"name": "x"}, "spec": {}}, gw)  # region is required
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apiVersion": "switchboard.dev/v1alpha1", "kind": "RealtimeGateway",
                             "metadata": {"name": "x"}, "spec": {"region": "eu", "replicas": "two"}}, gw)
    rules = str(crds["RealtimeGateway"])
    assert "minReplicas must not exceed maxReplicas" in rules, "CEL rule for autoscaling bounds"
    assert "set replicas or autoscaling, not both" in rules
