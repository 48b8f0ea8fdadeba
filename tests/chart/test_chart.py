"""The Helm charts, with the real Helm engine (helm-python-sdk): lint and
render for the default values and every values file in deploy/, schema
errors for bad values, every rendered object valid for the oldest and newest
supported Kubernetes (kubernetes-validate, strict), custom resources valid
against the generated CRDs and admitted by their CEL rules, the chart's CRDs
identical to crds/, and RBAC that lets the operator create what it applies
(docs/operator.md lists it; the operator's tests are authorized with it)."""

import json
import urllib.request
import time
import socket
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "manifests"))
from conftest import K8S_VERSIONS, OPERATOR  # noqa: E402
from test_manifests import schema_of  # noqa: E402
from admission import admit  # noqa: E402

import helm_python as helm  # noqa: E402

CHART = ROOT / "charts" / "switchboard"
CRD_CHART = ROOT / "charts" / "switchboard-crds"
VALUES_FILES = sorted((ROOT / "deploy" / "regions").rglob("*values*.yaml"))
NATS_VALUES = sorted((ROOT / "deploy" / "nats").glob("*values*.yaml"))


def load_values(path):
    return yaml.safe_load(path.read_text()) if path else None


def render(chart, values, namespace="switchboard"):
    out = helm.Chart.load(str(chart)).render(values or {}, name="sb", namespace=namespace)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.fixture(scope="session")
def crds():
    return {d["spec"]["names"]["kind"]: d for d in render(CRD_CHART, {})}


def test_values_files_exist_for_two_regions():
    regions = {load_values(p)["region"] for p in VALUES_FILES}
    assert {"eu", "us"} <= regions
    assert len(NATS_VALUES) >= 2


@pytest.mark.parametrize("chart", [CHART, CRD_CHART], ids=lambda p: p.name)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_lint_strict(chart, version):
    for values_file in [None, *VALUES_FILES] if chart == CHART else [None]:
        result = helm.lint(str(chart), load_values(values_file), strict=True, kube_version=f"v{version}.0")
        errors = [m for m in result["messages"] if m["severity"] > 1] + result.get("errors", [])
        assert not errors, f"{values_file}: {errors}"


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES], ids=lambda p: str(p.relative_to(ROOT)) if p else "defaults")
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_are_valid(values_file, version, crds):
    docs = render(CHART, load_values(values_file))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service"} <= kinds
    for d in docs:
        if d["kind"] in crds:
            jsonschema.validate(d, schema_of(crds[d["kind"]]))
            # CEL rules too, with a real CEL engine: Helm merges values
            # files over the chart's defaults, and the API server judges
            # the merged object.
            assert admit(d, crds) == [], (d["kind"], d["metadata"]["name"], admit(d, crds))
        else:
            kubernetes_validate.validate(d, version, strict=True)
    if values_file:
        assert {"RealtimeGateway", "TopicPolicy"} <= kinds
        # The operator accepts what the chart renders: it compiles it.
        manifest = ROOT / "tests" / ".work" / f"rendered-{values_file.parent.name}.yaml"
        manifest.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] in crds]))
        out = subprocess.run([OPERATOR, "render", str(manifest)], check=True, capture_output=True, text=True)
        assert "Deployment" in out.stdout
        assert out.stderr == "", f"policies rejected: {out.stderr}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_chart_objects_are_valid(version, crds):
    assert set(crds) == {"RealtimeGateway", "TopicPolicy"}
    for crd in crds.values():
        kubernetes_validate.validate(crd, version, strict=True)
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_chart_crds_are_the_generated_ones():
    generated = (ROOT / "crds" / "switchboard.dev.yaml").read_text()
    assert (CRD_CHART / "files" / "crds.yaml").read_text() == generated, \
        "charts/switchboard-crds/files/crds.yaml must be a copy of crds/switchboard.dev.yaml"


@pytest.mark.parametrize("values,message", [
    ({"gateway": {"enabled": True}}, "/region"),
    ({"gateway": {"enabled": True}, "region": "eu west"}, "/region"),
    ({"region": "eu", "gateway": {"enabled": True, "spec": {"limits": {"messageBytes": 5}}}}, "messageBytes"),
    ({"region": "eu", "gateway": {"enabled": True, "spec": {"replicas": 0}}}, "replicas"),
    # A gateway without a key would accept tokens signed with the public development secret.
    ({"region": "eu", "gateway": {"enabled": True, "spec": {"replicas": 1}}}, "auth"),
    ({"region": "eu", "gateway": {"enabled": True, "spec": {"replicas": 1, "auth": {"issuer": "x"}}}},
     "/gateway/spec/auth"),
    ({"operator": {"replicas": 0}}, "replicas"),
    ({"policies": [{"name": "p"}]}, "tenant"),
])
def test_bad_values_fail_with_the_schema_message(values, message):
    with pytest.raises(helm.HelmError) as err:
        helm.Chart.load(str(CHART)).render(values, name="sb", namespace="switchboard")
    assert message in str(err.value)


def rules_of(docs, kind):
    grants = set()
    for d in docs:
        if d["kind"] == kind:
            for rule in d["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            grants.add((group, resource, verb))
    return grants


def rbac_table(docs):
    """The chart's RBAC as the rows of docs/operator.md's table."""
    rows = []
    for kind, scope in (("ClusterRole", "cluster"), ("Role", "release namespace")):
        for d in docs:
            if d["kind"] != kind:
                continue
            for rule in d["rules"]:
                for group in rule["apiGroups"]:
                    shown = '`""` (core)' if group == "" else f"`{group}`"
                    resources = ", ".join(f"`{r}`" for r in rule["resources"])
                    rows.append(f"| {scope} | {shown} | {resources} | {', '.join(rule['verbs'])} |")
    return rows


def test_docs_list_the_rbac_the_chart_renders():
    text = (ROOT / "docs" / "operator.md").read_text()
    table = text.split("<!-- rbac:begin -->")[1].split("<!-- rbac:end -->")[0]
    documented = [line for line in table.strip().splitlines()[2:]]
    assert documented == rbac_table(render(CHART, {}))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_namespace_scope_grants_the_same_rules_in_the_release_namespace_only(version):
    docs = render(CHART, {"operator": {"scope": "namespace"}})
    kinds = {d["kind"] for d in docs}
    assert not {"ClusterRole", "ClusterRoleBinding"} & kinds, kinds
    for d in docs:
        kubernetes_validate.validate(d, version, strict=True)
        if d["kind"] in ("Role", "RoleBinding"):
            assert d["metadata"]["namespace"] == "switchboard", d["metadata"]
    cluster = rules_of(render(CHART, {}), "ClusterRole")
    assert rules_of(docs, "Role") >= cluster
    [operator] = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SWITCHBOARD_WATCH_NAMESPACE"] == "switchboard"


def test_every_resource_the_operator_applies_can_be_created_and_patched():
    # Server-side apply of an object that does not exist is authorized as
    # create as well as patch (the operator's tests check this end to end
    # under the rendered RBAC; this names the kinds for a quick failure).
    grants = rules_of(render(CHART, {}), "ClusterRole")
    objects = subprocess.run([OPERATOR, "render", str(ROOT / "deploy" / "examples" / "gateway.yaml")],
                             check=True, capture_output=True, text=True).stdout.splitlines()
    plural = {"ServiceAccount": "serviceaccounts", "ConfigMap": "configmaps", "Deployment": "deployments",
              "Service": "services", "PodDisruptionBudget": "poddisruptionbudgets",
              "HorizontalPodAutoscaler": "horizontalpodautoscalers"}
    kinds = set()
    for line in objects:
        obj = json.loads(line)
        group = obj["apiVersion"].rpartition("/")[0]
        kinds.add((group, plural[obj["kind"]]))
    assert len(kinds) >= 5
    for group, resource in kinds:
        for verb in ("create", "patch", "get", "list", "watch"):
            assert (group, resource, verb) in grants, (group, resource, verb)


def test_default_images_match_the_dockerfiles():
    docs = render(CHART, {})
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/switchboard-dev/operator:0.1.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SWITCHBOARD_GATEWAY_IMAGE"] == "ghcr.io/switchboard-dev/gateway:0.1.0"
    assert "ghcr.io/switchboard-dev/gateway:0.1.0" in (ROOT / "gateway" / "Dockerfile").read_text()
    assert "ghcr.io/switchboard-dev/operator:0.1.0" in (ROOT / "operator" / "Dockerfile").read_text()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


MONITORING_KINDS = {"PodMonitor", "PrometheusRule"}


@pytest.mark.parametrize("enabled", ["auto", False])
def test_prometheus_operator_objects_are_off_without_its_api(enabled):
    # helm-python-sdk renders without cluster capabilities: "auto" sees no
    # monitoring.coreos.com/v1 and renders nothing, as on a cluster without it.
    docs = render(CHART, {"monitoring": {"enabled": enabled}})
    assert not MONITORING_KINDS & {d["kind"] for d in docs}


def test_prometheus_operator_objects_scrape_the_admin_port_and_carry_the_alerts():
    docs = render(CHART, {"monitoring": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}})
    monitors = [d for d in docs if d["kind"] == "PodMonitor"]
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert len(monitors) == 2 and len(rules) == 1
    for d in monitors + rules:
        assert d["apiVersion"] == "monitoring.coreos.com/v1"
        assert d["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The gateway PodMonitor selects the pods the operator creates, on the
    # container port the operator names `admin` (never in the Service).
    gw_monitor = next(m for m in monitors if m["metadata"]["name"].endswith("-gateways"))
    objects = subprocess.run([OPERATOR, "render", str(ROOT / "deploy" / "examples" / "gateway.yaml")],
                             check=True, capture_output=True, text=True).stdout.splitlines()
    objects = [json.loads(o) for o in objects if o.strip()]
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    assert gw_monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    endpoint = gw_monitor["spec"]["podMetricsEndpoints"][0]
    ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] == "admin" and "admin" in ports and endpoint["path"] == "/metrics"
    service = next(o for o in objects if o["kind"] == "Service")
    assert all(p.get("targetPort") != "admin" and p["port"] != 9090 for p in service["spec"]["ports"])
    # The operator PodMonitor selects the operator pods on their metrics port.
    op_monitor = next(m for m in monitors if m is not gw_monitor)
    op_deploy = next(d for d in docs if d["kind"] == "Deployment")
    assert op_monitor["spec"]["selector"]["matchLabels"].items() <= op_deploy["spec"]["template"]["metadata"]["labels"].items()
    assert op_monitor["spec"]["podMetricsEndpoints"][0]["port"] in {
        p["name"] for p in op_deploy["spec"]["template"]["spec"]["containers"][0]["ports"]}
    # The rule groups are deploy/observability/alerts.yaml, templates intact.
    alerts = yaml.safe_load((ROOT / "deploy" / "observability" / "alerts.yaml").read_text())
    assert rules[0]["spec"] == alerts
    assert "{{ $labels.pod }}" in json.dumps(rules[0]["spec"])


@pytest.mark.parametrize("values,message", [
    ({"monitoring": {"enabled": "yes"}}, "monitoring"),
    ({"monitoring": {"interval": "often"}}, "interval"),
])
def test_bad_monitoring_values_fail_with_the_schema_message(values, message):
    with pytest.raises(helm.HelmError) as err:
        helm.Chart.load(str(CHART)).render(values, name="sb", namespace="switchboard")
    assert message in str(err.value)


GATEWAY = os.environ.get("SWITCHBOARD_BIN", str(ROOT / "target" / "debug" / "switchboard"))


def check_pod(docs):
    pods = [d for d in docs if d["kind"] == "Pod"]
    return pods[0] if pods else None


def run_helm_test_against_a_real_gateway(docs, tmp_path):
    """Compile the rendered custom resources with the operator, start the
    gateway binary with that policy bundle and the HS256 secret, then run
    the rendered test pod's command with its URL pointed at that gateway."""
    pod = check_pod(docs)
    manifest = tmp_path / "resources.yaml"
    manifest.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] in ("RealtimeGateway", "TopicPolicy")]))
    objects = [json.loads(line) for line in subprocess.run(
        [OPERATOR, "render", str(manifest)], check=True, capture_output=True, text=True).stdout.splitlines()]
    [config_map] = [o for o in objects if o["kind"] == "ConfigMap"]
    policy = tmp_path / "policy.yaml"
    policy.write_text(config_map["data"]["policy.yaml"])
    secret = tmp_path / "hs256"
    secret.write_text("helm-test-secret\n")

    def free():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    port, admin = free(), free()
    gateway = subprocess.Popen([GATEWAY, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                                "--policy-file", str(policy)],
                               env={**os.environ, "SWITCHBOARD_HS256_SECRET": "helm-test-secret", "RUST_LOG": "warn"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "gateway did not become ready"
            time.sleep(0.1)
        args = list(pod["spec"]["containers"][0]["args"])
        args[args.index("--url") + 1] = f"http://127.0.0.1:{port}"
        args[args.index("--secret-file") + 1] = str(secret)
        return subprocess.run([GATEWAY, *args, "--timeout-seconds", "15"], capture_output=True, text=True)
    finally:
        gateway.terminate()
        gateway.wait(timeout=15)


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda p: p.parent.name)
def test_helm_test_passes_against_a_gateway_running_the_rendered_policies(values_file, tmp_path):
    docs = render(CHART, load_values(values_file))
    pod = check_pod(docs)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    secret = pod["spec"]["volumes"][0]["secret"]
    assert secret["secretName"] == load_values(values_file)["gateway"]["spec"]["auth"]["hs256Secret"]["name"]
    done = run_helm_test_against_a_real_gateway(docs, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "published and delivered" in done.stdout


def test_helm_test_without_policies_uses_the_open_gateway_and_adds_no_tenant(tmp_path):
    values = {"region": "eu", "gateway": {"enabled": True, "spec": {
        "replicas": 1, "auth": {"hs256Secret": {"name": "auth", "key": "k"}}}}}
    docs = render(CHART, values)
    assert not [d for d in docs if d["kind"] == "TopicPolicy"], "a policy would close the gateway to everyone else"
    done = run_helm_test_against_a_real_gateway(docs, tmp_path)
    assert done.returncode == 0, done.stderr
    # Without an HS256 Secret nothing can mint a token: no test is rendered.
    values["gateway"]["spec"]["auth"] = {"jwksUrl": "https://id.example.com/jwks.json"}
    assert check_pod(render(CHART, values)) is None


def test_the_check_tenant_sees_nothing_else(tmp_path):
    """The check tenant's own policy allows only the check topic."""
    docs = render(CHART, load_values(VALUES_FILES[0]))
    pod = check_pod(docs)
    args = pod["spec"]["containers"][0]["args"]
    args[args.index("--topic") + 1] = "deal.won"
    done = run_helm_test_against_a_real_gateway(docs, tmp_path)
    assert done.returncode != 0
    assert "topic_not_allowed" in done.stderr, done.stderr
