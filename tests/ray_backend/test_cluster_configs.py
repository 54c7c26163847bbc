"""Offline checks of the cluster definitions in ``cluster/``.

* ``aws.yaml`` / ``gcp.yaml`` are validated against the JSON schema that the installed Ray ships
  for its cluster launcher (``ray/autoscaler/ray-schema.json``) and through Ray's own
  ``prepare_config`` + ``validate_config`` (what ``ray up`` runs before it contacts a cloud).
* The KubeRay ``RayJob``, the Dockerfile and the README are checked for the structure they
  promise: GPU workers scaling from zero, a CPU-only head, the package installed on every node,
  ``HF_TOKEN`` only ever coming from a secret store, and no literal tokens anywhere.

Nothing here starts Ray or touches the network.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ("aws.yaml", "gcp.yaml")
RAY_VERSION = importlib.metadata.version("ray")

# Hugging Face user access tokens look like "hf_" + 30-40 letters/digits.
HF_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")
PLACEHOLDER = re.compile(r"REPLACE_WITH_[A-Z0-9_]+")
CLUSTER_TEXT_FILES = (
    "aws.yaml",
    "gcp.yaml",
    "kuberay-rayjob.yaml",
    "Dockerfile",
    "Dockerfile.dockerignore",
    "README.md",
)


def _load_yaml(name: str) -> Any:
    with open(CLUSTER / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def parse_driver_args():
    """Parse ``python -m rqvae_ray.run`` arguments with the real CLI (names, types, choices), without running it."""
    import typer.main

    from rqvae_ray.cli.app import app

    command = typer.main.get_command(app)

    def parse(argv: list[str]) -> dict[str, Any]:
        try:
            return dict(command.make_context("rqvae-ray", list(argv)).params)
        except Exception as exc:  # click's usage errors
            pytest.fail(f"`python -m rqvae_ray.run {shlex.join(argv)}` is rejected by the CLI: {exc}")

    return parse


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    # find_spec locates the installed package without importing it (importing ray is slow).
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations, "ray is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"Ray's cluster launcher schema not found at {path}"
    with open(path, encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.validators.validator_for(schema).check_schema(schema)
    return schema


@pytest.fixture(scope="module", params=LAUNCHER_CONFIGS)
def launcher(request) -> tuple[str, dict]:
    config = _load_yaml(request.param)
    assert isinstance(config, dict), f"{request.param} is not a YAML mapping"
    return request.param, config


def _all_setup_commands(config: dict) -> list[str]:
    commands = list(config.get("initialization_commands", []))
    commands += config.get("setup_commands", [])
    commands += config.get("head_setup_commands", [])
    commands += config.get("worker_setup_commands", [])
    for node_type in config["available_node_types"].values():
        commands += node_type.get("initialization_commands", [])
        commands += node_type.get("worker_setup_commands", [])
    return commands


def _head_and_gpu_types(config: dict) -> tuple[dict, dict[str, dict]]:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu_workers = {
        name: t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) > 0
    }
    return head, gpu_workers


# ---------------------------------------------------------------------------------------------
# Cluster launcher configs (aws.yaml, gcp.yaml)
# ---------------------------------------------------------------------------------------------


def test_launcher_config_matches_ray_schema(launcher, ray_schema):
    name, config = launcher
    validator_cls = jsonschema.validators.validator_for(ray_schema)
    errors = sorted(validator_cls(ray_schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    assert not errors, f"{name} violates Ray {RAY_VERSION}'s ray-schema.json:\n" + "\n".join(
        f"  at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


def test_launcher_config_passes_ray_prepare_and_validate(launcher):
    """The offline part of `ray up`: merge the provider defaults, then Ray's own validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    name, config = launcher
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"], name
    assert prepared["provider"]["type"] == name.removesuffix(".yaml")


def test_head_is_cpu_only(launcher):
    name, config = launcher
    head, _ = _head_and_gpu_types(config)
    assert head["resources"].get("GPU", 0) == 0, f"{name}: the head must not advertise GPUs"
    node_config = head["node_config"]
    instance = node_config.get("InstanceType") or node_config.get("machineType")
    assert instance, f"{name}: head has no instance/machine type"
    assert not re.match(r"^(g\d|p\d|a2-|a3-|g2-)", instance), f"{name}: head type {instance} is a GPU type"
    assert "guestAccelerators" not in node_config, f"{name}: the head must not attach GPUs"


def test_one_autoscaling_gpu_worker_type(launcher):
    name, config = launcher
    _, gpu_workers = _head_and_gpu_types(config)
    assert len(gpu_workers) == 1, f"{name}: expected exactly one GPU worker type, found {sorted(gpu_workers)}"
    ((worker_name, worker),) = gpu_workers.items()
    assert worker.get("min_workers") == 0, f"{name}:{worker_name} must scale from zero (min_workers: 0)"
    assert worker.get("max_workers", 0) >= 1, f"{name}:{worker_name} needs max_workers >= 1"
    assert worker["max_workers"] <= config["max_workers"], f"{name}: global max_workers caps the GPU type"
    assert worker["resources"]["GPU"] >= 1 and worker["resources"].get("CPU", 0) >= 1
    assert config.get("idle_timeout_minutes", 0) > 0, f"{name}: idle GPU workers must be shut down"


def test_setup_installs_the_package_on_every_node(launcher):
    name, config = launcher
    mounts = config.get("file_mounts", {})
    repo_mounts = [remote for remote, local in mounts.items() if str(local).rstrip("/") in {".", "./"}]
    assert repo_mounts, f"{name}: file_mounts must copy the repository ('.') to the nodes"
    repo_path = repo_mounts[0].rstrip("/")
    install = re.compile(rf"pip install\b.*\s{re.escape(repo_path)}/?(\s|$)")

    def installs(commands: list[str]) -> bool:
        return any(install.search(c) for c in commands)

    common = config.get("setup_commands", [])
    assert installs(common) or (
        installs(config.get("head_setup_commands", [])) and installs(config.get("worker_setup_commands", []))
    ), f"{name}: the head and the workers must `pip install {repo_path}`"
    # torch with CUDA on GPU workers, a pinned Ray matching the local one everywhere.
    assert any("download.pytorch.org/whl/cu" in c for c in config.get("worker_setup_commands", [])), name
    assert any(f"ray[default,data]=={RAY_VERSION}" in c for c in _all_setup_commands(config)), (
        f"{name}: pin ray to the local version {RAY_VERSION}"
    )


def test_ray_start_commands(launcher):
    name, config = launcher
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head, name
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker, name
    for text in (head, worker):
        # Token authentication on every node, and HF_TOKEN read from a file, never written inline.
        assert "RAY_AUTH_MODE=token" in text, name
        assert 'HF_TOKEN="$(cat ' in text, name
    assert config["file_mounts"].get("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token", name


def test_hf_token_comes_from_a_secret_store(launcher):
    name, config = launcher
    commands = " ".join(_all_setup_commands(config))
    if config["provider"]["type"] == "aws":
        assert "get_parameter" in commands and "WithDecryption=True" in commands, name
        regions = set(re.findall(r'region_name="([^"]+)"', commands))
        assert regions == {config["provider"]["region"]}, f"{name}: SSM region must match provider.region"
    else:
        assert "gcloud secrets versions access" in commands, name
    assert "umask 077" in commands, f"{name}: the token file must be private"
    # No HF_TOKEN=<value> assignment anywhere except the $(cat ...) in the start commands.
    text = (CLUSTER / name).read_text(encoding="utf-8")
    for match in re.finditer(r"HF_TOKEN\s*[=:]\s*(\S+)", text):
        assert match.group(1).startswith('"$(cat'), f"{name}: HF_TOKEN set to a literal: {match.group(0)}"


# ---------------------------------------------------------------------------------------------
# KubeRay RayJob
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text(encoding="utf-8")) if d]
    assert len(docs) == 1, "kuberay-rayjob.yaml should hold exactly one object"
    return docs[0]


def _pod_specs(rayjob: dict) -> list[tuple[str, dict]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    specs = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    specs += [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    submitter = rayjob["spec"].get("submitterPodTemplate")
    if submitter:
        specs.append(("submitter", submitter["spec"]))
    return specs


def test_rayjob_kind_and_lifecycle(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == RAY_VERSION, "rayVersion must match the Ray the image/package uses"


def test_rayjob_entrypoint_runs_all_default_models_to_the_hub(rayjob, parse_driver_args):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "rqvae_ray.run"]
    params = parse_driver_args(argv[3:])
    assert not params["model_ids"], "no MODEL_ID arguments: run all default models"
    assert params["out_dir"] is None and params["hub_dir"] is None and not params["demo"], "must upload to the Hub"
    # The default GPU share is sized from the GPUs present at start: 0 on a cluster scaled to zero.
    assert params["gpus_per_actor"], (
        "pass --gpus-per-actor (or --gpus-per-model) > 0, or no GPU worker is ever requested"
    )
    assert params["address"] is None


def test_rayjob_head_and_autoscaling_gpu_group(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    head_containers = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for c in head_containers:
        for kind in ("limits", "requests"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(kind, {}), "the head must be CPU-only"
    groups = cluster["workerGroupSpecs"]
    gpu_groups = [
        g
        for g in groups
        if any(
            int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert len(gpu_groups) == 1, "expected one GPU worker group"
    group = gpu_groups[0]
    assert group["minReplicas"] == 0
    assert group["maxReplicas"] >= 1
    assert 0 <= group.get("replicas", 0) <= group["maxReplicas"]


def test_rayjob_hf_token_from_secret_in_every_container(rayjob):
    for where, pod in _pod_specs(rayjob):
        containers = pod.get("containers", []) + pod.get("initContainers", [])
        assert containers, f"{where}: no containers"
        for c in containers:
            env = {e["name"]: e for e in c.get("env", [])}
            assert "HF_TOKEN" in env, f"{where}/{c['name']}: HF_TOKEN missing"
            hf = env["HF_TOKEN"]
            assert "value" not in hf, f"{where}/{c['name']}: HF_TOKEN must not be a literal value"
            ref = hf["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"], f"{where}/{c['name']}: incomplete secretKeyRef"


def test_rayjob_image_has_the_package(rayjob):
    images = {c["image"] for _, pod in _pod_specs(rayjob) for c in pod["containers"]}
    assert len(images) == 1, f"head and workers should run the same image, got {images}"
    (image,) = images
    assert "rqvae-ray" in image and not image.startswith("rayproject/"), (
        "use the image built from cluster/Dockerfile (plain rayproject/ray lacks the package)"
    )


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_builds_on_ray_gpu_image_and_installs_package():
    instructions = _dockerfile_instructions()
    args: dict[str, str] = {}
    base = None
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key, value)
        elif keyword == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
            break
    assert base is not None, "Dockerfile has no FROM"
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3\d+-(gpu|cu\d+)", base), base

    copies = [rest for keyword, rest in instructions if keyword == "COPY"]
    assert copies, "the Dockerfile must COPY the repository"
    targets = {c.split()[-1].rstrip("/") for c in copies}
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert any(re.search(rf"pip install\b[^&]*\s{re.escape(t)}(\s|$)", runs) for t in targets), (
        "the Dockerfile must `pip install` the copied package"
    )
    assert "download.pytorch.org/whl/cu" in (CLUSTER / "Dockerfile").read_text(encoding="utf-8")


def test_dockerignore_keeps_venv_and_git_out():
    patterns = {
        line.strip()
        for line in (CLUSTER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv"} <= patterns
    assert "rqvae_ray" not in patterns and "pyproject.toml" not in patterns


# ---------------------------------------------------------------------------------------------
# Everything: no tokens, placeholders documented, README commands use real options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLUSTER_TEXT_FILES)
def test_no_literal_tokens(name):
    text = (CLUSTER / name).read_text(encoding="utf-8")
    assert not HF_TOKEN_LIKE.search(text), f"{name} contains something that looks like a Hugging Face token"
    if name != "README.md":  # the README shows this only as what not to do
        assert not re.search(r"env_vars.{0,80}HF_TOKEN", text, flags=re.S), (
            f"{name}: never pass secrets via runtime_env"
        )


def test_every_placeholder_is_documented():
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    found = set()
    for name in ("aws.yaml", "gcp.yaml", "kuberay-rayjob.yaml", "Dockerfile"):
        found |= set(PLACEHOLDER.findall((CLUSTER / name).read_text(encoding="utf-8")))
    missing = sorted(p for p in found if p not in readme)
    assert not missing, f"placeholders not explained in cluster/README.md: {missing}"


def _readme_driver_commands() -> list[list[str]]:
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            if "python -m rqvae_ray.run" in line:
                tail = line.split("python -m rqvae_ray.run", 1)[1].split("#", 1)[0]
                commands.append(shlex.split(tail))
    return commands


def test_readme_driver_commands_are_valid(parse_driver_args):
    from rqvae_ray.inputs.model_ids import DEFAULT_MODELS

    commands = _readme_driver_commands()
    assert commands, "README should show how to run the driver"
    for argv in commands:
        params = parse_driver_args(argv)
        assert params["address"] is None, "inside a Ray job the driver must not be given --address"
        assert params["gpus_per_actor"] is not None, f"cluster examples must set --gpus-per-actor: {argv}"
        unknown = set(params["model_ids"] or ()) - set(DEFAULT_MODELS)
        assert not unknown, f"README uses model IDs that are not published models: {unknown}"


def test_readme_covers_the_operations():
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    for needle in (
        "ray up",
        "ray down",
        "kubectl apply",
        "kubectl delete",
        "ray job submit",
        "--working-dir",
        "RAY_AUTH_MODE=token",
        "~/.ray/auth_token",
        "ray job logs -f",
        "ray status",
        "--gpus-per-actor 0.5",
        "--pools model",
        "alias `--gpus-per-model`",
        "idle_timeout_minutes",
        "Secrets Manager",
        "SSM Parameter Store",
    ):
        assert needle in readme, f"cluster/README.md should mention {needle!r}"
