"""infra/ validates offline: Ray's cluster-config checks on the launcher YAML, the KubeRay
manifests' structure, and every `python jobs/X.py --flag` they name. No network, no cluster."""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import socket
import subprocess
import sys

import jsonschema
import pytest
import yaml

from conftest import ROOT

INFRA = ROOT / "infra"
CLUSTER_YAML = INFRA / "aws" / "cluster.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
DOCKERFILE = INFRA / "Dockerfile"


def package_version() -> str:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]
JOB_COMMAND = re.compile(r"python3?\s+(jobs/[\w./-]+\.py)([^;&|\n]*)")


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def ray_validate(config: dict) -> dict:
    """What `ray up` checks before it touches AWS: merge with the provider's defaults, then the
    JSON schema and the node-type rules. The AWS bootstrap (IAM, subnets, key pairs) is the
    step that talks to AWS; it is not called."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def images(node):
    """Every container image in a parsed manifest."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "image" and isinstance(v, str):
                yield v
            else:
                yield from images(v)
    elif isinstance(node, list):
        for v in node:
            yield from images(v)


def job_commands(doc) -> list[tuple[str, list[str]]]:
    """Every `python jobs/X.py ...` in a parsed YAML document: (script, flags)."""
    found = []
    for s in strings(doc):
        for m in JOB_COMMAND.finditer(" ".join(s.split())):
            flags = [t.split("=", 1)[0] for t in shlex.split(m.group(2)) if t.startswith("--")]
            found.append((m.group(1), flags))
    return found


@functools.lru_cache(maxsize=None)
def job_help(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, f"{script} --help failed:\n{out.stderr[-2000:]}"
    return out.stdout


def unknown_flags(script: str, flags: list[str]) -> list[str]:
    accepted = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", job_help(script)))
    return [f for f in flags if f not in accepted]


# --- AWS cluster launcher ---------------------------------------------------------------------


def test_cluster_yaml_passes_ray_validation(offline):
    prepared = ray_validate(load(CLUSTER_YAML))
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU") == 0, "the head must advertise no GPU"
    assert head["max_workers"] == 0
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    gpus = {t["resources"]["GPU"] for t in workers.values()}
    assert {1, 8} <= gpus, f"want a 1-GPU and an 8-GPU worker type, got GPU counts {gpus}"
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{name}: GPU workers must scale from 0"
    assert any(t["max_workers"] > 0 and t["resources"]["GPU"] == 1 for t in workers.values())
    assert any(t["max_workers"] > 0 and t["resources"]["GPU"] == 8 for t in workers.values())
    spot = [t for t in workers.values() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot, "want an optional spot worker type"
    assert prepared["idle_timeout_minutes"] > 0
    for name, t in types.items():  # S3 through instance profiles
        assert "IamInstanceProfile" in t["node_config"], f"{name}: no instance profile"
    # token auth: the token file reaches every node, every `ray start` runs in token mode
    assert any(remote.endswith(".ray/auth_token") for remote in prepared["file_mounts"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key


def test_cluster_yaml_installs_the_pinned_version():
    text = CLUSTER_YAML.read_text()
    pins = re.findall(r"TOKRAY_VERSION=(\S+?) ", text)
    assert pins == [package_version()], f"want exactly one TOKRAY_VERSION={package_version()}, got {pins}"
    setup = " ".join(load(CLUSTER_YAML)["setup_commands"])
    assert "checkout" in setup and "v${TOKRAY_VERSION}" in setup
    assert "pip install" in setup
    assert not re.search(r"\b[0-9a-f]{40}\b", text), "a hand-copied commit instead of the version"


def broken(mutate):
    config = load(CLUSTER_YAML)
    mutate(config)
    return config


BREAKAGES = {
    "typo in a node type field": lambda c: c["available_node_types"]["ray.worker.gpu1"].update(max_worker=4),
    "GPU count as a string": lambda c: c["available_node_types"]["ray.worker.gpu8"]["resources"].update(GPU="8"),
    "head type not defined": lambda c: c.update(head_node_type="ray.head.missing"),
    "min_workers above the global cap": lambda c: c["available_node_types"]["ray.worker.gpu1"].update(min_workers=99),
    "unknown top-level key": lambda c: c.update(max_gpus=8),
    "node type without resources": lambda c: c["available_node_types"]["ray.worker.gpu1"].pop("resources"),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_ray_validation_rejects_a_broken_copy(name, offline):
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(broken(BREAKAGES[name]))


# --- KubeRay ----------------------------------------------------------------------------------


def check_cluster_spec(spec: dict, where: str):
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaler off"
    assert str(spec.get("rayVersion", "")).startswith("2.60"), f"{where}: rayVersion {spec.get('rayVersion')}"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth off"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)  # required by the CRD, even when empty
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"], f"{where}: head image"
    assert "nvidia.com/gpu" not in head_container.get("resources", {}).get("limits", {}), f"{where}: GPU on head"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate group names {names}"
    gpus = set()
    for g in groups:
        at = f"{where}: group {g['groupName']}"
        assert g["minReplicas"] == 0, f"{at}: must scale from 0"
        assert g["maxReplicas"] >= 1, at
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], at
        assert isinstance(g["rayStartParams"], dict), at
        container = g["template"]["spec"]["containers"][0]
        assert container["image"] == head_container["image"], f"{at}: head and workers must run one image"
        res = container["resources"]
        gpu = int(res["limits"]["nvidia.com/gpu"])
        assert gpu >= 1 and int(res.get("requests", {}).get("nvidia.com/gpu", gpu)) == gpu, at
        gpus.add(gpu)
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"] for v in g["template"]["spec"].get("volumes", [])}
        assert mounts <= volumes, f"{at}: mounts {mounts - volumes} have no volume"
    return gpus


def test_raycluster_structure():
    doc = load(RAYCLUSTER)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    assert 1 in check_cluster_spec(doc["spec"], "raycluster.yaml")


def test_rayjob_structure():
    doc = load(RAYJOB)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    assert spec["entrypoint"].startswith("python jobs/pretrain.py")
    # the platform's runtime env, not a drifting copy of it
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == load(INFRA / "runtime_env.yaml")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    head_image = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert submitter["containers"][0]["image"] == head_image
    assert submitter["containers"][0].get("workingDir"), "working_dir '.' needs a known cwd"


def test_rayjob_runs_on_the_raycluster_spec():
    """rayjob.yaml carries raycluster.yaml's spec verbatim, so the two cannot drift."""
    assert load(RAYJOB)["spec"]["rayClusterSpec"] == load(RAYCLUSTER)["spec"]


def test_all_infra_files_name_the_package_version():
    for p in (RAYCLUSTER, RAYJOB):  # the image tag is the pin
        tags = {image.rsplit(":", 1)[-1] for image in images(load(p))}
        assert tags == {package_version()}, f"{p.name}: image tags {tags}, pyproject.toml says {package_version()}"


def test_the_image_is_built_from_the_checkout():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.", text, re.M)
    assert re.search(r"^COPY .*\. /home/ray/tokray", text, re.M) and "pip install" in text
    assert "git clone" not in text  # the checkout itself, not a network fetch of some commit
    assert "infra/Dockerfile" in (INFRA / "README.md").read_text()


# --- entrypoints ------------------------------------------------------------------------------


def named_commands():
    cmds = []
    for path in (CLUSTER_YAML, RAYCLUSTER, RAYJOB):
        cmds += [(path.relative_to(ROOT), script, flags) for script, flags in job_commands(load(path))]
    return cmds


def test_manifests_name_a_job():
    scripts = {script for _, script, _ in named_commands()}
    assert "jobs/pretrain.py" in scripts


@pytest.mark.parametrize("source,script,flags", named_commands(),
                         ids=[f"{source.name}:{script}" for source, script, _ in named_commands()])
def test_named_entrypoints_exist_and_accept_their_flags(source, script, flags):
    assert (ROOT / script).is_file(), f"{source} runs {script}, which does not exist"
    assert not unknown_flags(script, flags), f"{source}: {script} does not accept {unknown_flags(script, flags)}"


def test_flag_check_catches_a_wrong_flag():
    [(script, flags)] = job_commands({"entrypoint": "python jobs/pretrain.py --recipe x --gpus 8 --out=/tmp/o"})
    assert flags == ["--recipe", "--gpus", "--out"]
    assert unknown_flags(script, flags) == ["--gpus"]


# --- secrets ----------------------------------------------------------------------------------

KEY_PATTERNS = [re.compile(p) for p in (r"(?i)aws_access_key_id", r"(?i)aws_secret", r"(?i)aws_session_token",
                                        r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")]


def leaked(text: str) -> list[str]:
    return [p.pattern for p in KEY_PATTERNS if p.search(text)]


def test_no_aws_keys_in_infra():
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert len(files) >= 5, files  # the scan saw the files it is meant to guard
    hits = {str(p.relative_to(ROOT)): leaked(p.read_text(errors="replace")) for p in files}
    assert not any(hits.values()), {k: v for k, v in hits.items() if v}


def test_key_scan_catches_a_key():
    assert leaked("aws_access_key_id = x")
    assert leaked("key: " + "AKIA" + "ABCDEFGHIJ234567")
    assert not leaked("IamInstanceProfile: {Name: tokray-worker}")


@pytest.mark.parametrize("readme", ["README.md", "infra/README.md"])
def test_every_job_a_readme_names_exists(readme):
    named = set(re.findall(r"\bjobs/[\w-]+\.py\b", (ROOT / readme).read_text())) - {"jobs/X.py"}  # a placeholder
    assert named, readme
    missing = sorted(j for j in named if not (ROOT / j).is_file())
    assert not missing, f"{readme} names {missing}, which do not exist"


def test_readme_points_at_real_files():
    text = (INFRA / "README.md").read_text()
    for ref in set(re.findall(r"infra/[\w./-]+\.(?:yaml|md)", text)):
        assert (ROOT / ref).is_file(), f"infra/README.md names {ref}, which does not exist"
    for needle in ("RAY_AUTH_MODE=token", "ray up", "ray down", "kubectl delete", "ray job submit"):
        assert needle in text, needle
