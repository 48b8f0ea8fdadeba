"""Our CRDs and every custom resource the project ships or documents, as a
real API server would judge them: CEL rules evaluated with a real CEL engine,
the static CEL cost limits, and the OpenAPI schema (see admission.py)."""

import copy
import re

import pytest
import yaml

import yaml_loader
from admission import PER_EXPRESSION_LIMIT, admit, cost_problems, crd_costs
from conftest import ROOT

EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
KINDS = {"RealtimeGateway", "TopicPolicy"}


def documented_resources():
    """Custom resources in deploy/examples and in the docs' YAML blocks."""
    found = []
    for path in EXAMPLES:
        found += [(str(path.relative_to(ROOT)), d) for d in yaml_loader.load_all(path) if d["kind"] in KINDS]
    for path in DOCS:
        for block in re.findall(r"```ya?ml\n(.*?)```", path.read_text(), re.S):
            try:
                docs = [d for d in yaml.safe_load_all(block) if isinstance(d, dict)]
            except yaml.YAMLError:
                continue
            found += [(str(path.relative_to(ROOT)), d) for d in docs if d.get("kind") in KINDS]
    return found


def test_every_crd_is_within_the_api_servers_cel_cost_limits(crds):
    for crd in crds.values():
        assert cost_problems(crd) == [], cost_problems(crd)
        for path, rule, cost, cardinality, total in crd_costs(crd):
            assert total <= PER_EXPRESSION_LIMIT, (path, rule)


def test_every_string_list_and_map_a_rule_reaches_is_bounded(crds):
    """Rules sit only where the sizes they see are bounded (the cost model
    above would otherwise count whatever fits in 3 MiB)."""
    from admission import walk
    for crd in crds.values():
        for version in crd["spec"]["versions"]:
            for path, node, cardinality in walk(version["schema"]["openAPIV3Schema"]):
                if node.get("x-kubernetes-validations"):
                    assert cardinality == 1 or cardinality <= 1000, (path, cardinality)


def test_the_cost_model_refuses_what_the_api_server_refuses():
    """The TopicPolicy rule this project once shipped: a regex `matches` on
    an unbounded string in an unbounded list (the API server estimated ~1e12
    and refused the CRD)."""
    pattern_rule = {"x-kubernetes-validations": [{
        "rule": "self.matches('^(([A-Za-z0-9_:-]+|[*])([.]([A-Za-z0-9_:-]+|[*]))*([.]>)?|>)$')"}],
        "type": "string"}
    crd = {"metadata": {"name": "topicpolicies.switchboard.dev"}, "spec": {"versions": [{"name": "v1alpha1", "schema": {
        "openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "subscribe": {"type": "array", "items": {"type": "object", "required": ["pattern"],
                                                     "properties": {"pattern": pattern_rule}}}}}}}}}]}}
    problems = cost_problems(crd)
    assert problems and "per expression" in problems[0], problems
    [(_, _, cost, cardinality, total)] = crd_costs(crd)
    assert total > 1e11
    # Bounded, the same rule fits.
    bounded = copy.deepcopy(crd)
    spec = bounded["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["subscribe"]["maxItems"] = 256
    spec["properties"]["subscribe"]["items"]["properties"]["pattern"]["maxLength"] = 256
    assert cost_problems(bounded) == []


def test_every_documented_custom_resource_is_admitted(crds):
    found = documented_resources()
    assert len(found) >= 4, found
    for where, obj in found:
        assert admit(obj, crds) == [], (where, obj["metadata"]["name"], admit(obj, crds))


def gw(**spec):
    return {"apiVersion": "switchboard.dev/v1alpha1", "kind": "RealtimeGateway",
            "metadata": {"name": "x"}, "spec": {"region": "eu", **spec}}


def tp(**spec):
    return {"apiVersion": "switchboard.dev/v1alpha1", "kind": "TopicPolicy",
            "metadata": {"name": "x"}, "spec": {"gateway": "rt", "tenant": "acme", **spec}}


@pytest.mark.parametrize("obj,refusal", [
    (gw(replicas=2, autoscaling={"minReplicas": 2, "maxReplicas": 4}), "set replicas or autoscaling, not both"),
    (gw(autoscaling={"minReplicas": 5, "maxReplicas": 4}), "minReplicas must not exceed maxReplicas"),
    (gw(autoscaling={"minReplicas": 0, "maxReplicas": 4}), "minimum"),
    (gw(region="eu west"), "does not match"),
    (gw(region="x" * 65), "too long"),
    (gw(service={"type": "ExternalName"}), "is not one of"),
    (gw(limits={"messageBytes": 10}), "minimum"),
    (gw(allowedOrigins=["https://a.example"] * 65), "too long"),
    (gw(telemetry={"samplingRatio": 2}), "maximum"),
    (tp(tenant="a b"), "does not match"),
    (tp(subscribe=[{"pattern": "deal..x"}]), "does not match"),
    (tp(subscribe=[{"pattern": "a." * 200 + "b"}]), "too long"),
    (tp(publish=[{"pattern": "x"}] * 257), "too long"),
    (tp(limits={"connections": 0}), "minimum"),
    (gw(autoscaling={"minReplicas": 1, "maxReplicas": 4}), "needs resources.requests.cpu"),
    (gw(autoscaling={"minReplicas": 1, "maxReplicas": 4, "targetConnectionsPerPod": 9, "targetCpuUtilization": 50},
        resources={"requests": {"memory": "1Gi"}}), "needs resources.requests.cpu"),
    (gw(autoscaling={"minReplicas": 1, "maxReplicas": 4, "targetConnectionsPerPod": 0}), "minimum"),
    (gw(autoscaling={"minReplicas": 1, "maxReplicas": 4, "targetConnectionsPerPod": 9, "scaleDownPeriodSeconds": 1}),
     "minimum"),
])
def test_each_rule_refuses_what_it_should(crds, obj, refusal):
    problems = admit(obj, crds)
    assert any(refusal in p for p in problems), problems


@pytest.mark.parametrize("obj", [
    gw(replicas=3), gw(autoscaling={"minReplicas": 2, "maxReplicas": 2}, resources={"requests": {"cpu": "1"}}), gw(),
    gw(autoscaling={"minReplicas": 2, "maxReplicas": 9, "targetConnectionsPerPod": 20000}),
    gw(autoscaling={"minReplicas": 2, "maxReplicas": 9, "targetConnectionsPerPod": 20000, "targetCpuUtilization": 80},
       resources={"requests": {"cpu": "500m"}}),
    tp(subscribe=[{"pattern": ">"}, {"pattern": "deal.*"}, {"pattern": "a.*.c.>"}], publish=[{"pattern": "deal.>"}]),
])
def test_valid_resources_pass_every_rule(crds, obj):
    assert admit(obj, crds) == []
