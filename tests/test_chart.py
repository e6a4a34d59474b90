"""charts/moe-runtime rendered by the real helm binary, then checked as Kubernetes objects.

Every ci/ scenario must lint strictly, render, and validate against the Kubernetes 1.30 schemas;
the rest assert the promises the chart makes: one Deployment per shard on its plane, immutable
selectors, narrow RBAC, NetworkPolicies that let exactly the stated traffic through, a schema
that rejects typos.
"""

from __future__ import annotations

import json
import re
import shutil
from functools import lru_cache
from pathlib import Path

import kubernetes_validate
import pytest

from services.autoscaler.policy import parse_targets
import yaml

from helm_tools import CHART, KUBE_VERSION, Helm, HelmUnavailable, ensure_helm

CI = sorted((CHART / "ci").glob("*-values.yaml"))
MINIMAL = CHART / "ci" / "minimal-cpu-values.yaml"
GPU = CHART / "ci" / "gpu-8-planes-values.yaml"
EXTERNAL = CHART / "ci" / "external-redis-values.yaml"
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
CONTRACTS = Path(__file__).resolve().parent.parent / "docs" / "contracts.md"


@pytest.fixture(scope="session")
def helm() -> Helm:
    try:
        return Helm(ensure_helm())
    except HelmUnavailable as err:  # fail, never skip: CI must not pass without the chart checked
        pytest.fail(str(err))


@pytest.fixture(scope="session")
def render(helm):
    @lru_cache(maxsize=None)
    def _render(*files: Path, set_values: tuple[str, ...] = (), release: str = "demo") -> list[dict]:
        return helm.render(*files, set_values=set_values, release=release)
    return _render


def of_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def by_name(objs, kind, name):
    (obj,) = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    return obj


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def pod_templates(objs):
    """(owner name, pod template) for every workload, plus the helm test pod."""
    out = [(o["metadata"]["name"], o["spec"]["template"]) for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    out += [(o["metadata"]["name"], o) for o in of_kind(objs, "Pod")]
    return out


# --- helm lint / template / kubernetes-validate -------------------------------------------------

@pytest.mark.parametrize("values", CI, ids=lambda p: p.name)
def test_ci_scenario_lints_strictly(helm, values):
    done = helm.run("lint", "--strict", str(CHART), "-f", str(values))
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("values", CI, ids=lambda p: p.name)
def test_ci_scenario_renders_objects_valid_for_kubernetes_1_30(render, values):
    objs = render(values)
    assert objs
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {err.message} at {list(err.path)}")


def test_ci_scenarios_cover_minimal_gpu_planes_and_external_redis():
    assert {MINIMAL, GPU, EXTERNAL} <= set(CI)


def test_each_component_deployment_comes_from_its_own_template(helm):
    text = helm.template(GPU).stdout
    sources = {}
    for doc in text.split("\n---\n"):
        source = re.search(r"^# Source: moe-runtime/(\S+)$", doc, re.MULTILINE)
        obj = yaml.safe_load(doc)
        if obj and obj["kind"] == "Deployment":
            component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
            sources.setdefault(component.split("-")[0], set()).add(source.group(1))
    assert sources == {role: {f"templates/{role}-deployment.yaml"}
                       for role in ("expert", "attention", "router", "gateway", "autoscaler")}


# --- shards, planes -----------------------------------------------------------------------------

def test_one_deployment_per_shard_spread_over_planes_with_placement_and_env(render):
    objs = render(GPU)
    values = yaml.safe_load(GPU.read_text())
    shards, planes = values["expertShards"], values["planes"]
    assert len(shards) == 16 and len(planes) == 8
    for i, shard in enumerate(shards):
        dep = by_name(objs, "Deployment", f"demo-moe-runtime-expert-{shard['name']}")
        plane = i % len(planes)
        pod = dep["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        env = env_of(container)
        assert container["command"] == ["python", "-m", "services.expert"]
        assert env["MOE_EXPERTS"] == shard["experts"] and env["MOE_SHARD_NAME"] == shard["name"]
        assert env["MOE_PLANE"] == str(plane)
        assert env["UCX_NET_DEVICES"] == f"mlx5_{plane}:1"
        assert env["MOE_DEVICE"] == "cuda" and env["MOE_UCX_PORT"] == "50054"
        assert env["UCXPY_PROGRESS_MODE"] == "polling"  # GPU + UCX: the mode that matched NCCL
        assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == f"rdma-plane{plane}"
        assert pod["spec"]["nodeSelector"] == planes[plane]["nodeSelector"]
        assert pod["spec"]["affinity"] == planes[plane]["affinity"]
        assert pod["spec"]["tolerations"] == planes[plane]["tolerations"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert dep["spec"]["replicas"] == shard["replicas"]
        assert dep["metadata"]["annotations"] == {
            "moe-runtime.io/min-replicas": str(shard["minReplicas"]),
            "moe-runtime.io/max-replicas": str(shard["maxReplicas"])}
        pdb = by_name(objs, "PodDisruptionBudget", dep["metadata"]["name"])
        assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    shard_deps = [d for d in of_kind(objs, "Deployment") if "-expert-" in d["metadata"]["name"]]
    assert len(shard_deps) == 16 and len(of_kind(objs, "PodDisruptionBudget")) == 16


def test_attention_gets_one_deployment_per_plane_with_its_dispatch_settings(render):
    objs = render(GPU)
    attention = [d for d in of_kind(objs, "Deployment") if "-attention-" in d["metadata"]["name"]]
    assert sorted(env_of(d["spec"]["template"]["spec"]["containers"][0])["MOE_PLANE"] for d in attention) == [
        str(p) for p in range(8)]
    env = env_of(attention[0]["spec"]["template"]["spec"]["containers"][0])
    assert (env["MOE_TRANSPORT"], env["MOE_DISPATCH_DTYPE"], env["MOE_MAX_BATCH"], env["MOE_KV_CACHE_TOKENS"]) == (
        "ucx", "fp8", "256", "1048576")


def test_gateway_gets_its_limit_on_unread_messages(render):
    for set_values, expected in (((), "4096"), (("gateway.maxUnread=128",), "128")):
        gateway = by_name(render(GPU, set_values=set_values), "Deployment", "demo-moe-runtime-gateway")
        assert env_of(gateway["spec"]["template"]["spec"]["containers"][0])["MOE_MAX_UNREAD"] == expected


def test_attention_gets_its_local_experts_only_when_some_are_named(render):
    def attention_env(*set_values: str) -> dict:
        objs = render(GPU, set_values=set_values)
        attention = [d for d in of_kind(objs, "Deployment") if "-attention-" in d["metadata"]["name"]]
        return env_of(attention[0]["spec"]["template"]["spec"]["containers"][0])

    assert "MOE_LOCAL_EXPERTS" not in attention_env()
    assert attention_env("attention.localExperts=0-15")["MOE_LOCAL_EXPERTS"] == "0-15"


def test_named_plane_overrides_the_spread(render):
    objs = render(GPU, set_values=("expertShards[0].plane=5", "attention.plane=3"))
    env = env_of(by_name(objs, "Deployment", "demo-moe-runtime-expert-e00")["spec"]["template"]["spec"]["containers"][0])
    assert env["MOE_PLANE"] == "5" and env["UCX_NET_DEVICES"] == "mlx5_5:1"
    attention = [d["metadata"]["name"] for d in of_kind(objs, "Deployment") if "-attention-" in d["metadata"]["name"]]
    assert attention == ["demo-moe-runtime-attention-p3"]


def test_plane_past_the_end_of_planes_fails_with_the_shard_named(helm):
    done = helm.template(MINIMAL, set_values=("expertShards[1].plane=1",), check=False)
    assert done.returncode != 0 and "expertShards[1].plane is 1 but only 1 plane(s)" in done.stderr


def test_replicas_outside_min_max_fail(helm):
    done = helm.template(MINIMAL, set_values=("expertShards[0].replicas=5",), check=False)
    assert done.returncode != 0 and "minReplicas <= replicas <= maxReplicas" in done.stderr


# --- labels and selectors -----------------------------------------------------------------------

def test_selectors_hold_only_name_instance_component_and_match_their_pods(render):
    for values in CI:
        objs = render(values)
        pods = {name: tpl["metadata"]["labels"] for name, tpl in pod_templates(objs)}
        for obj in objs:
            labels = obj["metadata"]["labels"]
            assert {"helm.sh/chart", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"} <= set(labels)
            if obj["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget"):
                selector = obj["spec"]["selector"]["matchLabels"]
                assert set(selector) == SELECTOR_KEYS, obj["metadata"]["name"]
                assert obj["kind"] == "PodDisruptionBudget" or selector.items() <= pods[obj["metadata"]["name"]].items()
            if obj["kind"] == "Service":
                assert set(obj["spec"]["selector"]) == SELECTOR_KEYS
                assert any(obj["spec"]["selector"].items() <= p.items() for p in pods.values())
        components = [o["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
                      for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
        assert len(components) == len(set(components)), "two workloads would select each other's pods"


def test_selectors_do_not_change_when_image_replicas_or_resources_change(render):
    def selectors(objs):
        return {o["metadata"]["name"]: o["spec"]["selector"] for o in objs if o["kind"] in ("Deployment", "StatefulSet")}
    before = selectors(render(MINIMAL))
    after = selectors(render(MINIMAL, set_values=(
        "image.tag=9.9.9", "expertShards[0].replicas=2", "expertShards[0].resources.limits.cpu=4")))
    assert before == after


# --- RBAC ---------------------------------------------------------------------------------------

def test_autoscaler_role_may_only_read_and_scale_this_releases_shard_deployments(render):
    objs = render(GPU)
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (role,) = of_kind(objs, "Role")
    shard_deps = sorted(d["metadata"]["name"] for d in of_kind(objs, "Deployment") if "-expert-" in d["metadata"]["name"])
    granted = set()
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["apps"]
        assert set(rule["resources"]) <= {"deployments", "deployments/scale"}
        assert set(rule["verbs"]) <= {"get", "list", "watch", "patch"}
        if {"get", "patch"} & set(rule["verbs"]):  # reads and writes of named objects: shards only
            assert sorted(rule["resourceNames"]) == shard_deps
        for resource in rule["resources"]:
            granted |= {(resource, verb) for verb in rule["verbs"]}
    assert granted == {("deployments", v) for v in ("get", "list", "watch", "patch")} | {
        ("deployments/scale", "get"), ("deployments/scale", "patch")}

    (binding,) = of_kind(objs, "RoleBinding")
    (account,) = of_kind(objs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "infer"}]

    autoscaler = by_name(objs, "Deployment", "demo-moe-runtime-autoscaler")["spec"]["template"]["spec"]
    assert autoscaler["serviceAccountName"] == account["metadata"]["name"]
    env = env_of(autoscaler["containers"][0])
    assert env["MOE_AUTOSCALER_ACTUATOR"] == "kubernetes"
    assert env["MOE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    targets = parse_targets(env["MOE_AUTOSCALER_TARGETS"])  # the autoscaler's own parser accepts it
    assert sorted(t.deployment for t in targets) == shard_deps
    assert all(1 <= t.min_replicas <= t.max_replicas for t in targets)
    for name, tpl in pod_templates(objs):  # nobody else gets an API token
        if name != "demo-moe-runtime-autoscaler":
            assert tpl["spec"]["automountServiceAccountToken"] is False, name


# --- NetworkPolicies ----------------------------------------------------------------------------

def _matches(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions")  # the chart only uses matchLabels
    return selector.get("matchLabels", {}).items() <= labels.items()


def allowed(policies, dst: dict, src: dict | None, port: int) -> bool:
    """Would ingress to pod `dst` from pod `src` (None: outside the namespace) on `port` pass?"""
    selecting = [p for p in policies if _matches(p["spec"]["podSelector"], dst)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if src is not None and "podSelector" in peer and "namespaceSelector" not in peer \
                        and _matches(peer["podSelector"], src):
                    return True
    return False


def test_network_policies_let_through_exactly_the_stated_traffic(render):
    objs = render(MINIMAL)
    policies = of_kind(objs, "NetworkPolicy")
    pods = {}
    for name, tpl in pod_templates(objs):
        pods[name.removeprefix("demo-moe-runtime-")] = tpl["metadata"]["labels"]
    other_release = {**pods["gateway"], "app.kubernetes.io/instance": "other"}
    sources = {**pods, "other-release": other_release, "outside": None}
    ports = {"expert-s0": 50053, "expert-s1": 50053, "router": 50051, "attention-p0": 50052,
             "gateway": 50050, "redis": 6379}
    expected = {
        "expert-s0": {"attention-p0"}, "expert-s1": {"attention-p0"}, "router": {"attention-p0"},
        "attention-p0": {"gateway"}, "gateway": set(sources),
        "redis": set(pods),  # every pod of this release (the test pod too), nothing else
    }
    for dst, port in ports.items():
        got = {name for name, src in sources.items() if allowed(policies, pods[dst], src, port)}
        assert got == expected[dst], dst
    for dst in [*ports, "autoscaler"]:  # metrics stay closed unless metricsFrom names someone
        assert not any(allowed(policies, pods[dst], src, 9400) for src in sources.values()), dst


def test_gateway_and_metrics_sources_are_configurable(render):
    objs = render(GPU)
    policies = of_kind(objs, "NetworkPolicy")
    gateway = by_name(policies, "NetworkPolicy", "demo-moe-runtime-gateway")
    assert gateway["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "clients"}}}]
    for policy in policies:
        if policy["metadata"]["name"] != "demo-moe-runtime-redis":
            assert {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                    "ports": [{"port": 9400, "protocol": "TCP"}]} in policy["spec"]["ingress"]


# --- Redis --------------------------------------------------------------------------------------

def test_bundled_redis_generates_a_secret_every_service_reads(render):
    objs = render(MINIMAL)
    (secret,) = of_kind(objs, "Secret")
    assert secret["metadata"]["name"] == "demo-moe-runtime-redis" and len(secret["data"]["redis-password"]) > 20
    assert of_kind(objs, "StatefulSet")
    for dep in of_kind(objs, "Deployment"):
        env = env_of(dep["spec"]["template"]["spec"]["containers"][0])
        assert env["MOE_REDIS_URL"] == "redis://demo-moe-runtime-redis:6379/0"
        assert env["MOE_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "demo-moe-runtime-redis", "key": "redis-password"}}


def test_bundled_redis_with_existing_secret_renders_no_secret(render):
    objs = render(MINIMAL, set_values=("redis.auth.existingSecret=mine",))
    assert not of_kind(objs, "Secret")
    redis = of_kind(objs, "StatefulSet")[0]["spec"]["template"]["spec"]["containers"][0]
    assert env_of(redis)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "mine", "key": "redis-password"}}


def test_external_redis_uses_url_and_existing_secret_only(render, helm):
    objs = render(EXTERNAL)
    assert not of_kind(objs, "StatefulSet") and not of_kind(objs, "Secret")
    assert "demo-moe-runtime-redis" not in {o["metadata"]["name"] for o in objs}
    for dep in of_kind(objs, "Deployment"):
        env = env_of(dep["spec"]["template"]["spec"]["containers"][0])
        assert env["MOE_REDIS_URL"] == "rediss://redis.shared.svc.cluster.local:6380/2"
        assert env["MOE_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "moe-redis", "key": "password"}}
        assert env["MOE_CLUSTER"] == "moe-prod"
    done = helm.template(EXTERNAL, set_values=("redis.externalUrl=",), check=False)
    assert done.returncode != 0 and "redis.externalUrl is required" in done.stderr


# --- pods: security, probes, model --------------------------------------------------------------

def test_every_pod_runs_non_root_read_only_without_capabilities(render):
    for values in CI:
        for name, tpl in pod_templates(render(values)):
            spec = tpl["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                              "capabilities": {"drop": ["ALL"]}}, name
            if name.endswith("-redis"):
                continue
            mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], name


def test_grpc_services_probe_grpc_health_on_their_own_port(render):
    objs = render(MINIMAL)
    ports = {"router": 50051, "gateway": 50050, "attention-p0": 50052, "expert-s0": 50053, "expert-s1": 50053}
    for suffix, port in ports.items():
        (c,) = by_name(objs, "Deployment", f"demo-moe-runtime-{suffix}")["spec"]["template"]["spec"]["containers"]
        assert env_of(c)["MOE_PORT"] == str(port)
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"] == port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}, (suffix, probe)


def test_model_is_mounted_read_only_where_weights_are_loaded(render, helm):
    objs = render(MINIMAL)
    for dep in of_kind(objs, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model"]
        name = dep["metadata"]["name"]
        if name.endswith(("-gateway", "-autoscaler")):
            assert not mounts, name  # the gateway never loads weights
            continue
        assert mounts == [{"name": "model", "mountPath": "/models/model", "readOnly": True}]
        assert env_of(spec["containers"][0])["MOE_MODEL_DIR"] == "/models/model"
        (volume,) = [v for v in spec["volumes"] if v["name"] == "model"]
        assert volume["hostPath"] == {"path": "/var/lib/moe-runtime/models/tiny", "type": "Directory"}
    both = helm.template(MINIMAL, set_values=("model.persistentVolumeClaim=x",), check=False)
    assert both.returncode != 0 and "only one of model.persistentVolumeClaim" in both.stderr
    pvc = render(EXTERNAL)
    (volume,) = [v for v in by_name(pvc, "Deployment", "demo-moe-runtime-router")["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == "model"]
    assert volume["persistentVolumeClaim"] == {"claimName": "moe-model", "readOnly": True}


def test_env_names_are_the_contracts(render):
    contract = set(re.findall(r"`(MOE_[A-Z_]+)`", CONTRACTS.read_text()))
    extra_allowed = {"UCX_NET_DEVICES", "UCXPY_PROGRESS_MODE", "REDIS_PASSWORD", "REDISCLI_AUTH"}  # UCX's and Redis' own
    for values in CI:
        for name, tpl in pod_templates(render(values)):
            for c in tpl["spec"]["containers"]:
                unknown = set(env_of(c)) - contract - extra_allowed
                assert not unknown, (name, unknown)


# --- schema -------------------------------------------------------------------------------------

@pytest.mark.parametrize("typo", [
    "expertShards[0].replica=2",         # misspelt key inside a list item
    "planes[0].nodeSelectr.a=b",         # misspelt key inside a plane
    "attention.kvCacheToken=4096",       # misspelt key in a section
    "transport=rdma",                    # value outside the enum
    "expertShards[0].experts=0..7",      # expert list in the wrong syntax
    "redis.auth.existingSecrets=x",
])
def test_schema_rejects_typos_at_install(helm, typo):
    done = helm.template(MINIMAL, set_values=(typo,), check=False)
    assert done.returncode != 0, typo
    assert "values don't meet the specifications of the schema" in done.stderr


def test_schema_closes_every_object():
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and path != "$.properties.global":
                if node.get("additionalProperties") is not False:
                    open_objects.append(path)
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")
    walk(schema, "$")
    assert not open_objects


def test_values_yaml_points_at_its_schema_and_comments_every_key():
    lines = (CHART / "values.yaml").read_text().splitlines()
    assert lines[0] == "# yaml-language-server: $schema=values.schema.json"
    uncommented = []
    for i, line in enumerate(lines):
        if re.match(r"^\s*(- )?[A-Za-z][\w.-]*:", line):
            before = lines[i - 1].strip()
            if not (before.startswith("#") or before.startswith("- #")):
                uncommented.append(line)
    assert not uncommented


# --- NOTES.txt and helm test --------------------------------------------------------------------

def test_notes_print_port_forward_and_generate_commands(helm, tmp_path):
    # helm renders NOTES.txt only on install (which needs a cluster); re-wrap it as a template.
    chart = tmp_path / "moe-runtime"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "test.notes" -}}' + notes + "{{- end }}")
    (chart / "templates" / "notes.yaml").write_text('notes: {{ include "test.notes" . | toJson }}\n')
    done = helm.run("template", "demo", str(chart), "-n", "infer", "-f", str(MINIMAL),
                    "--show-only", "templates/notes.yaml")
    text = yaml.safe_load(done.stdout)["notes"]
    assert "kubectl --namespace infer port-forward service/demo-moe-runtime-gateway 50050:50050" in text
    assert "moe generate --endpoint 127.0.0.1:50050 --prompt-ids" in text
    assert "helm test demo --namespace infer" in text


def test_helm_test_pod_checks_gateway_health_through_its_service(render):
    objs = render(MINIMAL)
    (pod,) = of_kind(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "services.common.healthcheck"]
    service = by_name(objs, "Service", "demo-moe-runtime-gateway")
    assert command[command.index("--host") + 1] == service["metadata"]["name"]
    assert command[command.index("--port") + 1] == str(service["spec"]["ports"][0]["port"])
    assert [s["metadata"]["name"] for s in of_kind(objs, "Service") if s["spec"].get("type") != "ClusterIP"
            and s["spec"].get("clusterIP") != "None"] == []  # default: nothing exposed beyond the cluster
