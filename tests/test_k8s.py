"""Kubernetes manifests, container images and tracking-server configuration, checked offline.

Every overlay under k8s/overlays is rendered with `kubectl kustomize` (from a temporary copy in
which each committed `*.env.example` stands in for the gitignored `*.env` secret file) and every
rendered object is validated against the Kubernetes API schemas of `kubernetes-validate`
(strict: unknown fields fail). The Training Operator's PyTorchJob is a custom resource outside
those schemas: its own fields are checked with the JSON schema below and each replica's pod
template with the core PodTemplate schema. Then the properties that matter in production:
resources on every container, no plaintext secrets, probes on the servers, references that
resolve, pinned images. The Dockerfiles cannot be built here (no container engine), so their
structure is linted instead.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = sorted(path.parent.name for path in (K8S / "overlays").glob("*/kustomization.yaml"))
NAMESPACE = "deepsc"
# Oldest Kubernetes minor we support, and the newest the validator knows.
K8S_VERSIONS = ("1.30", "latest")
MODEL_URI = "models:/deepsc-covid@champion"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)
URI_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "PyTorchJob"}

# The PyTorchJob fields we use (kubeflow.org/v1, Training Operator >= 1.7); pod templates are
# validated separately against the core schema.
PYTORCHJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["pytorchReplicaSpecs"],
            "additionalProperties": False,
            "properties": {
                "nprocPerNode": {"type": "string", "pattern": "^([1-9][0-9]*|auto|cpu|gpu)$"},
                "runPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                        "backoffLimit": {"type": "integer", "minimum": 0},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                        "suspend": {"type": "boolean"},
                    },
                },
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "required": ["Master"],
                    "additionalProperties": False,
                    "properties": {
                        "Master": {"$ref": "#/$defs/replicaSpec"},
                        "Worker": {"$ref": "#/$defs/replicaSpec"},
                    },
                },
            },
        },
    },
    "$defs": {
        "replicaSpec": {
            "type": "object",
            "required": ["replicas", "template"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 1},
                "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
                "template": {"type": "object"},
            },
        }
    },
}


# --------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl (with its built-in kustomize) is not on PATH")
    return path


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """k8s/ without any real secret file. Each *.env.example becomes the *.env it documents,
    every value replaced by a unique sentinel that must never show up outside a Secret."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("*.env"))
    for example in root.rglob("*.env.example"):
        keys = _env_keys(example)
        assert keys, f"{example} documents no variable"
        lines = [f"{key}=sentinel-{uuid.uuid4().hex[:12]}" for key in keys]
        example.with_name(example.name.removesuffix(".example")).write_text("\n".join(lines) + "\n")
    return root


def _env_keys(path: Path) -> list[str]:
    return [
        line.split("=", 1)[0].strip()
        for line in path.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    ]


@pytest.fixture(scope="module")
def rendered(kubectl: str, k8s_copy: Path) -> dict[str, list[dict]]:
    """overlay name -> its rendered objects."""
    out = {}
    for overlay in OVERLAYS:
        result = subprocess.run(
            [kubectl, "kustomize", str(k8s_copy / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"kustomize {overlay} failed:\n{result.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def _all_objects(rendered: dict[str, list[dict]]) -> Iterator[tuple[str, dict]]:
    for overlay, objects in rendered.items():
        for obj in objects:
            yield overlay, obj


def _one(objects: list[dict], kind: str, name: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _by_prefix(objects: list[dict], kind: str, prefix: str) -> dict:
    """Generated ConfigMaps and Secrets carry a content-hash suffix."""
    found = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"].startswith(prefix + "-")]
    assert len(found) == 1, f"expected one {kind} named {prefix}-<hash>, found {len(found)}"
    return found[0]


def _pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        yield kind, spec["template"]["spec"]
    elif kind == "CronJob":
        yield kind, spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "PyTorchJob":
        for replica, replica_spec in spec["pytorchReplicaSpecs"].items():
            yield f"PyTorchJob/{replica}", replica_spec["template"]["spec"]


def _containers(obj: dict) -> Iterator[dict]:
    for _, pod in _pod_specs(obj):
        yield from pod.get("initContainers", [])
        yield from pod["containers"]


def _resolved_env(container: dict, objects: list[dict]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (Secret values base64-decoded)."""
    by_name = {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(by_name[("ConfigMap", source["configMapRef"]["name"])]["data"])
        if "secretRef" in source:
            data = by_name[("Secret", source["secretRef"]["name"])]["data"]
            env.update({key: base64.b64decode(value).decode() for key, value in data.items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = base64.b64decode(by_name[("Secret", ref["name"])]["data"][ref["key"]]).decode()
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = by_name[("ConfigMap", ref["name"])]["data"][ref["key"]]
    return env


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def _quantity(text: str | int) -> float:
    """A Kubernetes resource quantity as a number (cores or bytes)."""
    text = str(text)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    assert match and (match.group(2) in units or not match.group(2)), f"bad quantity {text!r}"
    return float(match.group(1)) * units.get(match.group(2), 1.0)


# --------------------------------------------------------------------------- schema validation


def test_expected_overlays_exist() -> None:
    assert {"onprem", "aws", "gpu"} <= set(OVERLAYS)


def test_every_object_validates_against_kubernetes_schemas(rendered) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    versions = [latest_version() if v == "latest" else v for v in K8S_VERSIONS]
    checked = 0
    for overlay, obj in _all_objects(rendered):
        if obj["kind"] == "PyTorchJob":
            continue  # custom resource: see test_pytorchjob_validates
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} invalid for {version}: {error.message}")
            checked += 1
    assert checked >= 2 * 30


def test_validator_rejects_an_unknown_field(rendered) -> None:
    """The schema check above is live: a misspelt field in a Deployment fails strict validation."""
    import kubernetes_validate

    deployment = copy.deepcopy(_one(rendered["onprem"], "Deployment", "deepsc-serving"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ping"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_pytorchjob_validates(rendered) -> None:
    import jsonschema
    import kubernetes_validate

    jobs = [obj for _, obj in _all_objects(rendered) if obj["kind"] == "PyTorchJob"]
    assert jobs, "no overlay renders the PyTorchJob"
    for job in jobs:
        jsonschema.Draft202012Validator(PYTORCHJOB_SCHEMA).validate(job)
        for replica, spec in job["spec"]["pytorchReplicaSpecs"].items():
            pod_template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{job['metadata']['name']}-{replica.lower()}"},
                "template": spec["template"],
            }
            kubernetes_validate.validate(pod_template, K8S_VERSIONS[0], strict=True)
    broken = copy.deepcopy(jobs[0])
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["replica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(PYTORCHJOB_SCHEMA).validate(broken)


# --------------------------------------------------------------------------- production properties


def test_every_container_has_requests_and_limits(rendered) -> None:
    for overlay, obj in _all_objects(rendered):
        for container in _containers(obj):
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']} container {container['name']}"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where} lacks {kind}"
            for resource, request in resources["requests"].items():
                assert _quantity(request) <= _quantity(resources["limits"][resource]), f"{where}: {resource} request > limit"


def test_pods_run_as_non_root(rendered) -> None:
    for overlay, obj in _all_objects(rendered):
        for kind, pod in _pod_specs(obj):
            assert pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{overlay}: {kind}/{obj['metadata']['name']}"
            for container in pod["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_no_plaintext_secrets(rendered) -> None:
    committed = [path for path in K8S.rglob("*.yaml") if re.search(r"^kind:\s*Secret\s*$", path.read_text(), re.M)]
    assert not committed, f"Secret manifests committed: {committed}"
    for overlay, objects in rendered.items():
        secrets = [obj for obj in objects if obj["kind"] == "Secret"]
        secret_values = {
            base64.b64decode(value).decode()
            for secret in secrets
            for value in secret.get("data", {}).values()
        }
        assert secret_values and all(value.startswith("sentinel-") for value in secret_values)
        for obj in objects:
            name = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            if obj["kind"] == "Secret":
                assert "stringData" not in obj and re.search(r"-[a-z0-9]{10}$", obj["metadata"]["name"]), (
                    f"{name} is not from a secretGenerator"
                )
                continue
            text = json.dumps(obj)
            leaked = [value for value in secret_values if value in text]
            assert not leaked, f"{name} contains a Secret value in plain text"
            assert not URI_WITH_PASSWORD.search(text), f"{name} has a URI with a password"
            if obj["kind"] == "ConfigMap":
                assert not [key for key in obj.get("data", {}) if SECRET_NAME.search(key)], f"{name} holds a secret"
            for container in _containers(obj):
                for item in container.get("env", []):
                    if SECRET_NAME.search(item["name"]):
                        assert "secretKeyRef" in item.get("valueFrom", {}), f"{name}: {item['name']} is not a secretKeyRef"


def test_secret_files_are_gitignored() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    examples = sorted(K8S.rglob("*.env.example"))
    assert examples
    for example in examples:
        real = example.with_name(example.name.removesuffix(".example"))
        ignored = subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=REPO).returncode == 0
        example_ignored = subprocess.run(["git", "check-ignore", "-q", str(example)], cwd=REPO).returncode == 0
        assert ignored and not example_ignored, example


def test_references_resolve(rendered) -> None:
    """Every Secret/ConfigMap/PVC a pod names is rendered too (with the key it reads)."""
    for overlay, objects in rendered.items():
        data = {(obj["kind"], obj["metadata"]["name"]): obj.get("data", {}) for obj in objects}
        claims = {obj["metadata"]["name"] for obj in objects if obj["kind"] == "PersistentVolumeClaim"}
        for obj in objects:
            for container in _containers(obj):
                for source in container.get("envFrom", []):
                    for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                        if field in source:
                            assert (kind, source[field]["name"]) in data, f"{overlay}: missing {kind} {source[field]['name']}"
                for item in container.get("env", []):
                    for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                        ref = item.get("valueFrom", {}).get(field)
                        if ref:
                            assert ref["key"] in data.get((kind, ref["name"]), {}), f"{overlay}: {kind} {ref['name']}:{ref['key']}"
            for _, pod in _pod_specs(obj):
                for volume in pod.get("volumes", []):
                    if "persistentVolumeClaim" in volume:
                        assert volume["persistentVolumeClaim"]["claimName"] in claims
                    if "configMap" in volume:
                        assert ("ConfigMap", volume["configMap"]["name"]) in data


def test_images_are_resolved_and_pinned(rendered) -> None:
    for overlay, obj in _all_objects(rendered):
        for container in _containers(obj):
            image = container["image"]
            assert "/" in image or image.startswith("postgres:"), f"{overlay}: unresolved image {image}"
            tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest", f"{overlay}: image {image} is not pinned"


def test_everything_lives_in_the_namespace_and_is_labelled(rendered) -> None:
    for overlay, obj in _all_objects(rendered):
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "deepsc", f"{overlay}: {obj['kind']}"


# --------------------------------------------------------------------------- the services


def test_serving_serves_the_champion_with_probes(rendered) -> None:
    for overlay, objects in rendered.items():
        deployment = _one(objects, "Deployment", "deepsc-serving")
        template = deployment["spec"]["template"]
        (container,) = template["spec"]["containers"]
        command = container["command"] + container["args"]
        assert command[:3] == ["mlflow", "models", "serve"]
        assert f"--model-uri={MODEL_URI}" in command
        assert "--env-manager=local" in command and "--host=0.0.0.0" in command
        port = next(arg.split("=")[1] for arg in command if arg.startswith("--port="))
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["http"] == int(port)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/ping", "port": "http"}, probe
        assert _resolved_env(container, objects)["MLFLOW_TRACKING_URI"] == "http://mlflow-tracking:5000"
        assert "deepsc/champion-version" in template["metadata"]["annotations"]
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        service = _one(objects, "Service", "deepsc-serving")
        assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()


def test_tracking_server_uses_postgres_and_proxied_s3(rendered) -> None:
    for overlay, objects in rendered.items():
        deployment = _one(objects, "Deployment", "mlflow-tracking")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = _resolved_env(container, objects)
        args = [_expand(arg, env) for arg in container["args"]]
        assert args[0] == "server" and "--serve-artifacts" in args
        backend = next(arg.split("=", 1)[1] for arg in args if arg.startswith("--backend-store-uri="))
        artifacts = next(arg.split("=", 1)[1] for arg in args if arg.startswith("--artifacts-destination="))
        assert backend.startswith("postgresql://postgres:5432/") and "@" not in backend
        assert artifacts.startswith("s3://")
        assert {"PGUSER", "PGPASSWORD"} <= set(env)
        assert "mlflow-tracking:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health"
        service = _one(objects, "Service", "mlflow-tracking")
        assert service["spec"]["ports"][0]["port"] == 5000
        postgres = _one(objects, "StatefulSet", "postgres")
        assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
        assert _one(objects, "Service", "postgres")["spec"]["ports"][0]["port"] == 5432

        if overlay in {"onprem", "gpu"}:  # MinIO through an endpoint URL and least-privilege keys
            assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
            minio = _one(objects, "StatefulSet", "minio")
            assert minio["spec"]["volumeClaimTemplates"]
            assert _one(objects, "Service", "minio")
            script = _one(objects, "Job", "minio-create-buckets")["spec"]["template"]["spec"]["containers"][0]["args"][0]
            bucket = artifacts.removeprefix("s3://").split("/")[0]
            assert "mc mb --ignore-existing" in script and f"deepsc/{bucket}" in script
        if overlay == "aws":  # real S3 through IRSA: no endpoint, no keys
            assert "MLFLOW_S3_ENDPOINT_URL" not in env and "AWS_ACCESS_KEY_ID" not in env
            account = _one(objects, "ServiceAccount", "mlflow-tracking")
            assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
            assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "mlflow-tracking"


def _mlflow_command(*path: str):
    import click
    from mlflow.cli import cli

    command = cli
    for name in path:
        command = command.get_command(click.Context(command), name)
    return command


def test_mlflow_command_lines_parse(rendered) -> None:
    """The server and model-server arguments are options MLflow's own CLI accepts (typos fail)."""
    import click

    serve, server = _mlflow_command("models", "serve"), _mlflow_command("server")
    for overlay, objects in rendered.items():
        (serving,) = _one(objects, "Deployment", "deepsc-serving")["spec"]["template"]["spec"]["containers"]
        parsed = serve.make_context("serve", serving["args"][2:]).params
        assert parsed["model_uri"] == MODEL_URI and parsed["env_manager"] == "local"
        (tracking,) = _one(objects, "Deployment", "mlflow-tracking")["spec"]["template"]["spec"]["containers"]
        env = _resolved_env(tracking, objects)
        parsed = server.make_context("server", [_expand(arg, env) for arg in tracking["args"][1:]]).params
        assert parsed["serve_artifacts"] and parsed["backend_store_uri"].startswith("postgresql://")
    compose = yaml.safe_load((REPO / "mlflow" / "docker-compose.yaml").read_text())
    assert server.make_context("server", compose["services"]["mlflow"]["command"][1:]).params["serve_artifacts"]
    with pytest.raises(click.UsageError):
        server.make_context("server", ["--serve-artifact"])


def test_pytorchjob_runs_torchrun_finetune_on_gpus(rendered) -> None:
    job = _one(rendered["gpu"], "PyTorchJob", "deepsc-finetune")
    nproc = int(job["spec"]["nprocPerNode"])
    for replica, spec in job["spec"]["pytorchReplicaSpecs"].items():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the Training Operator's container name
        command = container["command"] + container["args"]
        assert command[0] == "torchrun"
        module = command.index("-m")
        assert command[module + 1] == "deepsc.cli"
        stage = command.index("train")
        assert command[stage + 1 : stage + 3] == ["--stage", "finetune"]
        assert any(arg.startswith("--nproc-per-node=") for arg in command[:module])
        for kind in ("requests", "limits"):
            assert int(container["resources"][kind]["nvidia.com/gpu"]) == nproc, replica
        assert pod["nodeSelector"]
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
        assert _resolved_env(container, rendered["gpu"])["MLFLOW_TRACKING_URI"].startswith("http://mlflow-tracking")
    assert not any(obj["kind"] == "PyTorchJob" for obj in rendered["onprem"] + rendered["aws"])


def test_pytorchjob_arguments_parse_with_the_deepsc_cli(rendered) -> None:
    """What torchrun hands to `deepsc.cli` is a valid `deepsc train` command line."""
    from deepsc.cli import build_parser

    job = _one(rendered["gpu"], "PyTorchJob", "deepsc-finetune")
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        args = spec["template"]["spec"]["containers"][0]["args"]
        parsed = build_parser("train").parse_args(args[args.index("deepsc.cli") + 1 :])
        assert parsed.command == "train" and parsed.stage == "finetune"
        assert parsed.seg_init is not None and parsed.cls_init is not None and parsed.no_progress


# --------------------------------------------------------------------------- images and MLflow configuration


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), " ".join(rest.split())))
    return instructions


def test_dockerfile_installs_like_the_makefile() -> None:
    steps = _dockerfile_instructions(REPO / "Dockerfile")
    text = [f"{keyword} {rest}" for keyword, rest in steps]
    first_from = next(rest for keyword, rest in steps if keyword == "FROM")
    assert "python:3.11-slim" in first_from or "${PYTHON_IMAGE}" in first_from
    assert any(rest == "PYTHON_IMAGE=python:3.11-slim" for keyword, rest in steps if keyword == "ARG")
    assert any(rest == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" for keyword, rest in steps if keyword == "ARG")

    def position(pattern: str) -> int:
        found = [i for i, line in enumerate(text) if re.search(pattern, line)]
        assert found, f"no Dockerfile step matches {pattern!r}"
        return found[0]

    torch = position(r'pip install --index-url "?\$\{TORCH_INDEX_URL\}"? torch==2\.13\.0\b')
    copy_lock = position(r"^COPY requirements\.lock constraints\.txt ")
    lock = position(r"pip install -r requirements\.lock -c constraints\.txt")
    package = position(r"pip install --no-deps \.")
    assert torch < copy_lock < lock < package
    assert not [line for line in text[:torch] if "pip install" in line and "torch" in line]

    final_stage = text[max(i for i, line in enumerate(text) if line.startswith("FROM ")) :]
    users = [line.split()[1] for line in final_stage if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert [line for line in final_stage if line.startswith("ENTRYPOINT ")] == ['ENTRYPOINT ["deepsc"]']


def test_dockerignore_admits_what_the_dockerfiles_copy() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert "*" in (REPO / ".dockerignore").read_text().splitlines()
    for dockerfile in (REPO / "Dockerfile", REPO / "mlflow" / "Dockerfile"):
        for keyword, rest in _dockerfile_instructions(dockerfile):
            if keyword == "COPY" and not rest.startswith("--from"):
                sources = rest.split()[:-1]
                for source in sources:
                    assert source.rstrip("/") in allowed, f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"
                    assert (REPO / source).exists(), f"COPY {source}: no such file"


def test_tracking_server_image_matches_the_clients() -> None:
    lock = dict(
        line.split("==", 1)
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    server = dict(
        line.split("==", 1)
        for line in (REPO / "mlflow" / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert server["mlflow"] == lock["mlflow"] and server["boto3"] == lock["boto3"]
    assert "psycopg2-binary" in server
    steps = _dockerfile_instructions(REPO / "mlflow" / "Dockerfile")
    assert any("-c /tmp/build/requirements.lock" in rest for keyword, rest in steps if keyword == "RUN")
    assert [rest for keyword, rest in steps if keyword == "USER"][-1].split(":")[0] != "0"


def test_compose_trio_matches_the_cluster_images() -> None:
    compose = yaml.safe_load((REPO / "mlflow" / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "minio-create-buckets", "mlflow"} <= set(services)
    manifests = "\n".join(path.read_text() for path in K8S.rglob("*.yaml"))
    for name in ("postgres", "minio", "minio-create-buckets"):
        assert f"image: {services[name]['image']}" in manifests, f"{name} image differs from k8s/"
    assert "--serve-artifacts" in services["mlflow"]["command"]
    example = dict(
        line.split("=", 1)
        for line in (REPO / "mlflow" / "server.env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert example["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert example["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert not URI_WITH_PASSWORD.search(example["MLFLOW_BACKEND_STORE_URI"])
