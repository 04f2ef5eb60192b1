"""Deployment files: compose, Kubernetes manifests and Dockerfile agree with each other and with the CLI."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from totalrecall.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
APP_VARIABLES = {"TOTALRECALL_DATABASE_URL", "TOTALRECALL_BROKER_URL", "TOTALRECALL_STORAGE_URL",
                 "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
APP_SERVICES = ("migrate", "worker-gpu", "worker-cpu", "beat")
_TOTALRECALL_IN_SHELL = re.compile(r"(?:^|[\s;&|(])totalrecall((?:\s+[a-z][a-z-]*)+)")


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


SECRETS_EXAMPLE = DEPLOY / "k8s-secrets.example.yaml"


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """The manifests of k8s/ and the Secrets' example (applied apart, edited)."""
    docs = []
    for path in [*sorted(K8S.glob("*.y*ml")), SECRETS_EXAMPLE]:
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def _k8s(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"] if "template" in doc.get("spec", {}) else []


def _is_totalrecall_image(image: str | None) -> bool:
    """The project's image: `[registry/]totalrecall[:tag]`, or compose's `${TOTALRECALL_IMAGE:-...}`."""
    if not image:
        return False
    return image.startswith("${TOTALRECALL_IMAGE") or image.split("/")[-1].split(":")[0] == "totalrecall"


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.y*ml"))
    assert COMPOSE in files and len(files) >= 2
    for path in files:
        assert [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None], path


# --- docker compose -------------------------------------------------------------------------------------


def test_compose_services() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "minio", "createbucket", *APP_SERVICES, "flower"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis:7")
    assert services["minio"]["image"].startswith("minio/minio")
    for name in ("postgres", "redis", "minio", "worker-gpu", "worker-cpu", "beat", "flower"):
        assert services[name]["healthcheck"]["test"], name


def _probed_node(probe: str) -> str:
    """The node a `celery inspect ping --destination NODE` probe pings, with the shell's host name as %h."""
    node = probe.split("--destination", 1)[1].split()[0]
    return node.replace("$$HOSTNAME", "%h").replace("$HOSTNAME", "%h")


def test_worker_probes_ping_the_node_the_worker_is_named() -> None:
    """A probe that pings another name fails for ever: Kubernetes would kill every worker minutes after it
    started, mid-task (tests/test_faults.py checks that a worker so named answers the probe)."""
    services = _compose()["services"]
    for name in ("worker-gpu", "worker-cpu"):
        command = services[name]["command"]
        node = command[command.index("--name") + 1]
        assert _probed_node(services[name]["healthcheck"]["test"][1]) == node == "totalrecall@%h", name
    for name in ("totalrecall-worker-gpu", "totalrecall-worker-cpu"):
        (container,) = _containers(_k8s("Deployment", name))
        args = container["args"]
        node = args[args.index("--name") + 1]
        assert _probed_node(container["livenessProbe"]["exec"]["command"][-1]) == node == "totalrecall@%h", name


def test_compose_passes_every_documented_setting_to_its_containers() -> None:
    """A setting put in deploy/.env reaches the workers (compose passes only what it names); the image
    sets TOTALRECALL_HOME and TOTALRECALL_CACHE_DIR itself."""
    readme = (DEPLOY.parent / "README.md").read_text()
    documented = {name for line in readme.splitlines() if line.startswith("| `TOTALRECALL_")
                  for name in re.findall(r"`(TOTALRECALL_[A-Z0-9_]+)`", line)}
    assert len(documented) > 20
    passed = set(_compose()["x-app-environment"])
    assert documented - {"TOTALRECALL_HOME", "TOTALRECALL_CACHE_DIR"} <= passed, sorted(documented - passed)
    assert not {n for n in passed if n.startswith("TOTALRECALL_")} - documented  # no misspelt name


def test_compose_gpu_worker_reserves_a_gpu() -> None:
    services = _compose()["services"]
    gpu = services["worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["command"][:3] == ["worker", "--queues", "fit,score"]
    assert "deploy" not in services["worker-cpu"]  # the CPU worker must start on hosts without a GPU


def test_compose_creates_the_bucket_and_migrates_before_the_workers() -> None:
    services = _compose()["services"]
    bucket = services["createbucket"]
    assert bucket["image"].startswith("minio/mc")
    script = " ".join(bucket["entrypoint"] + bucket["command"])
    assert "mc mb --ignore-existing" in script and "mc alias set" in script
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    assert bucket["restart"] == "no"

    migrate = services["migrate"]
    assert migrate["command"] == ["db", "upgrade"] and migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker-gpu", "worker-cpu", "beat"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["createbucket"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == depends["redis"]["condition"] == "service_healthy", name
    valid = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services and spec["condition"] in valid, (name, dependency)
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)


def test_compose_beat_flower_and_settings() -> None:
    services = _compose()["services"]
    beat = services["beat"]
    assert beat["command"] == ["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    flower = services["flower"]
    assert "flower" in flower["command"] and flower["environment"]["CELERY_BROKER_URL"]
    assert any(str(port).endswith(":5555") for port in flower["ports"])
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    for name in APP_SERVICES:
        service = services[name]
        assert _is_totalrecall_image(service["image"])
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        environment = service["environment"]
        assert set(environment) >= APP_VARIABLES, name
        for variable in APP_VARIABLES:  # taken from deploy/.env, never written into the compose file
            assert environment[variable].startswith(f"${{{variable}"), (name, variable)
            assert variable in example
    for name, service in services.items():  # no literal secret anywhere: all come from deploy/.env
        environment = service.get("environment") or {}
        for variable, value in environment.items():
            if re.search(r"PASSWORD|SECRET|AUTH|_URL$", variable) and variable != "AWS_ENDPOINT_URL":
                assert str(value).startswith("${"), (name, variable)


COMPOSE_CLIENTS = {  # how to call it; how to ask whether it works without an engine
    "docker compose v2": (["docker", "compose"], ["docker", "compose", "version"]),
    "docker-compose v1": (["docker-compose"], ["docker-compose", "version"]),
}


def _compose_client(client: str) -> list[str]:
    """The command of `client`, or skip saying why it cannot run here."""
    command, probe = COMPOSE_CLIENTS[client]
    if shutil.which(command[0]) is None:
        pytest.skip(f"{client}: `{command[0]}` not on PATH (.ci/run installs Debian's docker-compose)")
    done = subprocess.run(probe, capture_output=True, text=True, timeout=60, env=_clean_env())
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        pytest.skip(f"{client} not available: {why[0][:200] if why else done.returncode}")
    return command


def _clean_env() -> dict[str, str]:
    """No TOTALRECALL_* or AWS_* of the test run: compose would prefer them to the env file."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}


def _compose_config(client: list[str], env_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*client, "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
                          capture_output=True, text=True, timeout=120, env=_clean_env(), cwd=DEPLOY)


@pytest.mark.parametrize("client", list(COMPOSE_CLIENTS))
def test_compose_config_is_valid(client: str, tmp_path: Path) -> None:
    """`compose config` validates the file (no engine needed) with deploy/.env.example, and refuses to
    run without the secrets of deploy/.env."""
    command = _compose_client(client)
    done = _compose_config(command, ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    (device,) = config["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert config["services"]["migrate"]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert config["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "change-me-postgres"
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = _compose_config(command, empty)
    assert refused.returncode != 0 and "set in deploy/.env" in refused.stderr, refused.stderr


# --- Kubernetes -----------------------------------------------------------------------------------------


def test_every_k8s_document_is_well_formed() -> None:
    docs = _k8s_docs()
    assert docs
    names: set[tuple[str, str]] = set()
    for filename, doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), filename
        assert doc["metadata"].get("name"), filename
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "totalrecall", (filename, doc["metadata"]["name"])
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in names, key
        names.add(key)
        if doc["kind"] in ("Deployment", "Job"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            selector = doc["spec"].get("selector", {}).get("matchLabels", {})
            assert selector.items() <= labels.items(), filename
    deployments = ("worker-gpu", "worker-cpu", "beat", "flower")
    expected = {("Namespace", "totalrecall"), ("Secret", "totalrecall-secrets"),
                ("ConfigMap", "totalrecall-config"), ("Job", "totalrecall-migrate"),
                ("Service", "totalrecall-flower"), *(("Deployment", f"totalrecall-{d}") for d in deployments)}
    assert expected <= names


def test_applying_the_k8s_folder_never_overwrites_the_secrets() -> None:
    """`kubectl apply -f deploy/k8s/` (the documented step) must not replace Secrets made from a secret
    store with placeholders: they live in the example file outside the folder."""
    in_folder = [(name, d["kind"]) for name, d in _k8s_docs() if name != SECRETS_EXAMPLE.name]
    assert in_folder and all(kind != "Secret" for _, kind in in_folder), in_folder
    example = [d for name, d in _k8s_docs() if name == SECRETS_EXAMPLE.name]
    assert {d["metadata"]["name"] for d in example} == {"totalrecall-secrets", "totalrecall-flower"}
    assert all("CHANGE-ME" in value for d in example for value in d["stringData"].values())


def test_k8s_workers_cap_their_threads_to_their_cpus() -> None:
    """Each pool process would otherwise start a thread per core of the node and be throttled by the
    pod's CPU quota."""
    for name in ("totalrecall-worker-gpu", "totalrecall-worker-cpu"):
        (container,) = _containers(_k8s("Deployment", name))
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        processes = int(container["args"][container["args"].index("--concurrency") + 1])
        resources = container["resources"]
        cpus = float(resources.get("limits", {}).get("cpu") or resources["requests"]["cpu"])
        for var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
            assert 1 <= int(env[var]) * processes <= cpus, (name, var)


def test_k8s_configuration_reaches_every_totalrecall_container() -> None:
    secret, config = _k8s("Secret", "totalrecall-secrets"), _k8s("ConfigMap", "totalrecall-config")
    provided = set(secret["stringData"]) | set(config["data"])
    assert provided >= APP_VARIABLES
    assert all(isinstance(v, str) for v in config["data"].values())  # ConfigMap values must be strings
    secrets = {d["metadata"]["name"]: d for _, d in _k8s_docs() if d["kind"] == "Secret"}
    for _, doc in _k8s_docs():
        for container in _containers(doc):
            for ref in container.get("env", []):
                key_ref = ref.get("valueFrom", {}).get("secretKeyRef")
                if key_ref:
                    assert key_ref["key"] in secrets[key_ref["name"]]["stringData"], ref
            if not _is_totalrecall_image(container["image"]):
                continue
            refs = {next(iter(r)): next(iter(r.values()))["name"] for r in container["envFrom"]}
            assert refs == {"configMapRef": "totalrecall-config", "secretRef": "totalrecall-secrets"}


def test_k8s_gpu_worker_beat_and_flower() -> None:
    gpu = _k8s("Deployment", "totalrecall-worker-gpu")
    (container,) = _containers(gpu)
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert str(container["resources"]["requests"].get("nvidia.com/gpu", "1")) == "1"
    assert container["args"][:3] == ["worker", "--queues", "fit,score"]
    (cpu_container,) = _containers(_k8s("Deployment", "totalrecall-worker-cpu"))
    assert "nvidia.com/gpu" not in json.dumps(cpu_container["resources"])

    beat = _k8s("Deployment", "totalrecall-beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    assert _containers(beat)[0]["args"] == ["beat"]
    # its schedule file outlives the pod (a fresh one would skip a night missed while it was recreated)
    (mount,) = _containers(beat)[0]["volumeMounts"]
    (volume,) = [v for v in beat["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert mount["mountPath"] == "/data"  # TOTALRECALL_HOME, where beat keeps celerybeat-schedule
    assert _k8s("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])

    flower = _k8s("Deployment", "totalrecall-flower")
    service = _k8s("Service", "totalrecall-flower")
    assert service["spec"]["selector"].items() <= flower["spec"]["template"]["metadata"]["labels"].items()
    (flower_container,) = _containers(flower)
    assert "flower" in flower_container["command"]
    ports = {p["name"]: p["containerPort"] for p in flower_container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports or port["targetPort"] in ports.values()

    job = _k8s("Job", "totalrecall-migrate")
    assert _containers(job)[0]["args"] == ["db", "upgrade"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


# --- Dockerfile -----------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                             if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    text = " ".join(f"{i} {a}" for i, a in instructions)
    (base,) = [a for i, a in instructions if i == "ARG" and a.startswith("CUDA_IMAGE=")]
    assert "nvidia/cuda:" in base and "runtime" in base
    assert "python3.11" in text
    assert "pip install torch==2.14.1 torchvision==0.29.1" in text
    # one CUDA in the image: the base's is the pinned torch wheel's (the one installed here), and no
    # faiss-gpu build for another CUDA is mixed in (a driver the base accepts could not run torch: the
    # "GPU" worker would compute on its CPU)
    base_major = base.split("nvidia/cuda:", 1)[1].split(".")[0]
    if torch.__version__.split("+")[0] == "2.14.1" and torch.version.cuda:
        assert base_major == torch.version.cuda.split(".")[0], (base, torch.version.cuda)
    assert all(major == base_major for major in re.findall(r"faiss-gpu-cu(\d+)", text)), text
    assert "pip install ." in text
    users = [a.split(":")[0] for i, a in instructions if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoints = [json.loads(a) for i, a in instructions if i == "ENTRYPOINT"]
    assert entrypoints[-1] == ["totalrecall"]


# --- every `totalrecall` command used by the deployment exists in the CLI ---------------------------------


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def _invocations() -> list[tuple[str, list[str]]]:
    """(where, argv after `totalrecall`) for every CLI call in compose, the manifests and the Dockerfile."""
    found: list[tuple[str, list[str]]] = []
    compose = _compose()
    for name, service in compose["services"].items():
        if _is_totalrecall_image(service.get("image")) and "entrypoint" not in service:
            found.append((f"compose {name}", list(service.get("command") or [])))
        for text in _strings([service.get("command"), service.get("entrypoint"), service.get("healthcheck")]):
            found += [(f"compose {name}", shlex.split(m)) for m in _TOTALRECALL_IN_SHELL.findall(text)]
    for filename, doc in _k8s_docs():
        for container in _containers(doc):
            if _is_totalrecall_image(container["image"]) and "command" not in container:
                found.append((f"{filename} {container['name']}", list(container.get("args") or [])))
            probes = [container.get(k) for k in ("command", "args", "livenessProbe", "readinessProbe")]
            for text in _strings(probes):
                found += [(filename, shlex.split(m)) for m in _TOTALRECALL_IN_SHELL.findall(text)]
    instructions = _dockerfile_instructions()
    cmd = [json.loads(a) for i, a in instructions if i == "CMD"]
    found.append(("Dockerfile CMD", cmd[-1]))
    for instruction, arguments in instructions:
        if instruction == "RUN":
            found += [("Dockerfile RUN", shlex.split(m)) for m in _TOTALRECALL_IN_SHELL.findall(arguments)]
    return found


def _subcommand_path(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Walk the subparsers' choices along `argv` (e.g. `db upgrade`); fails on an unknown subcommand."""
    path: list[str] = []
    words = [w for w in argv if not w.startswith("-")]
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            return path
        choices = actions[0].choices
        assert words, f"`totalrecall {' '.join(path)}` needs a subcommand: one of {sorted(choices)}"
        word = words.pop(0)
        command = " ".join([*path, word])
        assert word in choices, f"`totalrecall {command}` is not a command ({sorted(choices)})"
        path.append(word)
        parser = choices[word]


def test_every_cli_command_used_by_the_deployment_exists() -> None:
    invocations = _invocations()
    seen = {tuple(_subcommand_path(build_parser(), argv)) for _, argv in invocations}
    assert {("db", "upgrade"), ("worker",), ("beat",)} <= seen
    for where, argv in invocations:
        try:
            build_parser().parse_args(argv)  # the options too (--queues, --concurrency ...)
        except SystemExit as exc:
            pytest.fail(f"{where}: `totalrecall {' '.join(argv)}` is rejected by the CLI ({exc})")
