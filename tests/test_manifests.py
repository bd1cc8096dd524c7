"""The cluster manifests in cluster/manifests parse and say what running on a cluster needs.

cluster-gpu-aws.yaml (Ray cluster launcher): the Ray 2.60 GPU image, autoscaling GPU workers, no
training on the head, the project installed from its file mount, token auth on every node, a
dashboard on the head's loopback only, and a shared NFS (EFS) filesystem mounted on every host
before the container starts and passed into the container at the same path.
rayjob-compare.yaml (KubeRay RayJob plus a PersistentVolumeClaim): `gendertune compare` with GPUs
whose --data and --out are on a ReadWriteMany volume mounted in the head and every worker
(gendertune refuses node-local paths on a multi-node cluster), Ray
2.60.0, token auth, one image throughout, a GPU in every worker.

Only YAML parsing and Ray's bundled JSON schema: no network, no Ray runtime.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import jsonschema
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "cluster" / "manifests"
LAUNCHER = "cluster-gpu-aws.yaml"
RAYJOB = "rayjob-compare.yaml"


@functools.cache
def documents(name: str) -> tuple[dict, ...]:
    """Every YAML document in the manifest (rayjob-compare.yaml holds a RayJob and a PVC)."""
    with open(MANIFESTS / name, encoding="utf-8") as handle:
        return tuple(doc for doc in yaml.safe_load_all(handle) if doc is not None)


def of_kind(name: str, kind: str) -> list[dict]:
    return [doc for doc in documents(name) if doc.get("kind") == kind]


def load(name: str) -> dict:
    """The manifest's main document: the launcher config, or the RayJob."""
    if name == RAYJOB:
        jobs = of_kind(name, "RayJob")
        assert len(jobs) == 1, f"expected one RayJob in {name}"
        return jobs[0]
    docs = documents(name)
    assert len(docs) == 1, f"expected one document in {name}"
    return docs[0]


def pinned_ray() -> Requirement:
    """The `ray` requirement in pyproject.toml: every manifest's Ray must satisfy it."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        deps = tomllib.load(handle)["project"]["dependencies"]
    return next(req for req in map(Requirement, deps) if req.name == "ray")


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` in argv, or None when absent."""
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


# --- cluster-gpu-aws.yaml (ray up) ------------------------------------------------------------


def node_type(name: str) -> dict:
    return load(LAUNCHER)["available_node_types"][name]


def start_commands() -> list[str]:
    config = load(LAUNCHER)
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


def ray_start_argv(commands: list[str]) -> list[str]:
    """The argv of the one `ray start` in commands, without any `export ...;` prefix."""
    found = [shlex.split(cmd.rsplit(";", 1)[-1]) for cmd in commands if "ray start" in cmd]
    assert len(found) == 1, f"expected one `ray start` in {commands}"
    return found[0]


def test_launcher_is_valid_for_ray_up():
    # Ray's own schema for `ray up` configs, read from the installed package (without importing Ray).
    spec = importlib.util.find_spec("ray")
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(load(LAUNCHER), json.loads(schema_path.read_text(encoding="utf-8")))
    config = load(LAUNCHER)
    assert config["cluster_name"] == "gendertune"
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_launcher_image_is_ray_260_gpu_matching_the_pin():
    image = load(LAUNCHER)["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)(-py\d+)?-gpu", image)
    assert match, f"{image} is not a rayproject/ray GPU image"
    assert Version(match.group(1)) in pinned_ray().specifier, "image Ray must satisfy pyproject's pin"
    assert match.group(1).startswith("2.60.")


def test_gpu_workers_autoscale_and_the_head_trains_nothing():
    config = load(LAUNCHER)
    worker = node_type("gpu_worker")
    assert worker["resources"]["GPU"] >= 1
    assert worker["resources"]["CPU"] >= 1
    assert worker["max_workers"] > worker["min_workers"] >= 0
    assert worker["max_workers"] <= config["max_workers"]
    assert config["head_node_type"] == "head"
    assert node_type("head")["resources"]["CPU"] == 0
    assert "GPU" not in node_type("head")["resources"]


def test_setup_installs_the_mounted_project():
    config = load(LAUNCHER)
    installs = [shlex.split(cmd) for cmd in config["setup_commands"] if "pip install" in cmd]
    assert installs, "no setup command installs the project"
    targets = [arg for argv in installs for arg in argv[2:] if not arg.startswith("-")]
    mounted_repo = [target for target in targets if config["file_mounts"].get(target) == "."]
    assert mounted_repo, f"pip installs {targets}, none of them the file mount of the repo root"


def test_head_dashboard_is_loopback_only():
    argv = ray_start_argv(load(LAUNCHER)["head_start_ray_commands"])
    assert "--head" in argv
    assert flag_value(argv, "--dashboard-host") == "127.0.0.1"
    assert flag_value(argv, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"


def test_workers_join_the_head_port():
    head = ray_start_argv(load(LAUNCHER)["head_start_ray_commands"])
    worker = ray_start_argv(load(LAUNCHER)["worker_start_ray_commands"])
    assert flag_value(worker, "--address") == f"$RAY_HEAD_IP:{flag_value(head, '--port')}"


def test_every_start_command_sets_token_auth():
    commands = start_commands()
    assert any("ray start --head" in cmd for cmd in commands)
    assert any("ray start --address" in cmd for cmd in commands)
    for cmd in commands:
        assert re.match(r"(export )?RAY_AUTH_MODE=token\b", cmd), cmd


def test_every_node_gets_the_token():
    # RAY_AUTH_MODE=token without a token file makes `ray start` fail on that node.
    mounts = load(LAUNCHER)["file_mounts"]
    assert mounts.get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"


def simple_commands(command: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, ||, ;, | and parentheses), without sudo."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "(", ")", "&"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [argv[1:] if argv[:1] == ["sudo"] else argv for argv in commands if argv]


def nfs_mounts(commands: list[str]) -> list[tuple[str, str]]:
    """(source, target) of every `mount -t nfs4|nfs ... SOURCE TARGET` in commands."""
    found = []
    for command in commands:
        for argv in simple_commands(command):
            if argv[0] == "mount" and flag_value(argv, "-t") in ("nfs", "nfs4"):
                found.append((argv[-2], argv[-1]))
    return found


def docker_volumes(run_options: list[str]) -> list[tuple[str, str]]:
    """(host, container) of every -v/--volume HOST:CONTAINER[:MODE] in docker run_options."""
    argv = [arg for option in run_options for arg in shlex.split(option)]
    specs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-v", "--volume")]
    specs += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--volume=")]
    return [tuple(spec.split(":")[:2]) for spec in specs]


def test_launcher_mounts_shared_storage_on_every_node_and_in_the_container():
    # gendertune refuses --data/--out that not every node sees, so every node mounts one NFS
    # filesystem (EFS) on the host before docker starts, and the container sees it at the same path.
    config = load(LAUNCHER)
    mounts = nfs_mounts(config.get("initialization_commands", []))
    assert len(mounts) == 1, f"expected one NFS mount in initialization_commands, got {mounts}"
    source, target = mounts[0]
    assert ":" in source, f"{source} is not an NFS export (HOST:PATH)"
    assert PurePosixPath(target).is_absolute()
    assert any(
        argv[:1] == ["mkdir"] and target in argv
        for cmd in config["initialization_commands"]
        for argv in simple_commands(cmd)
    )
    assert (target, target) in docker_volumes(config["docker"].get("run_options", [])), (
        f"the container must see the host's {target} at {target}"
    )
    # A node type's own initialization_commands or docker section would replace the global ones,
    # leaving that node without the shared filesystem.
    for name, node in config["available_node_types"].items():
        assert "initialization_commands" not in node, name
        assert "docker" not in node, name


# --- rayjob-compare.yaml (KubeRay) ------------------------------------------------------------


def cluster_spec() -> dict:
    return load(RAYJOB)["spec"]["rayClusterSpec"]


def head_container() -> dict:
    return cluster_spec()["headGroupSpec"]["template"]["spec"]["containers"][0]


def worker_groups() -> list[dict]:
    return cluster_spec()["workerGroupSpecs"]


def worker_containers() -> list[dict]:
    return [c for group in worker_groups() for c in group["template"]["spec"]["containers"]]


def all_containers() -> list[dict]:
    return [*cluster_spec()["headGroupSpec"]["template"]["spec"]["containers"], *worker_containers()]


def env_value(container: dict, name: str) -> str | None:
    return next((var.get("value") for var in container.get("env", []) if var["name"] == name), None)


def entrypoint_argv() -> list[str]:
    return shlex.split(load(RAYJOB)["spec"]["entrypoint"])


def test_rayjob_kind_and_lifecycle():
    job = load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["metadata"]["name"] == "gendertune-compare"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def pod_specs() -> list[dict]:
    """The head's pod spec, then every worker group's."""
    return [
        cluster_spec()["headGroupSpec"]["template"]["spec"],
        *(group["template"]["spec"] for group in worker_groups()),
    ]


def shared_mount_path(path: str) -> str:
    """The mountPath of the head container's volume that holds `path` (the longest match)."""
    mounts = [
        m["mountPath"]
        for m in head_container().get("volumeMounts", [])
        if PurePosixPath(path).is_relative_to(m["mountPath"])
    ]
    assert mounts, f"{path} is not on any volume mounted in the head"
    return max(mounts, key=len)


def test_entrypoint_compares_with_gpus():
    argv = entrypoint_argv()
    assert argv[:2] == ["gendertune", "compare"]
    assert "--gpu" in argv
    for flag in ("--data", "--out"):
        # This manifest uses the shared volume (an s3:// URI would also do; see the README).
        assert PurePosixPath(flag_value(argv, flag) or "").is_absolute(), flag


def test_data_and_out_are_on_a_rwx_volume_in_every_pod():
    # Trials read --data and write checkpoints on any worker; the driver on the head writes --out.
    # gendertune refuses paths that not every node sees, so both must be on one ReadWriteMany claim
    # that the head and every worker container mount at the same path.
    argv = entrypoint_argv()
    claims = {pvc["metadata"]["name"]: pvc for pvc in of_kind(RAYJOB, "PersistentVolumeClaim")}
    for flag in ("--data", "--out"):
        mount_path = shared_mount_path(flag_value(argv, flag))
        claim_names = set()
        for pod in pod_specs():
            volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
            for container in pod["containers"]:
                mounted = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path]
                assert len(mounted) == 1, f"{container['name']} does not mount {mount_path}"
                assert not mounted[0].get("readOnly", False), container["name"]
                volume = volumes.get(mounted[0]["name"])
                assert volume and "persistentVolumeClaim" in volume, f"{container['name']}: {mount_path} is not a PVC"
                claim_names.add(volume["persistentVolumeClaim"]["claimName"])
        assert len(claim_names) == 1, f"{flag}: pods mount different claims at {mount_path}: {claim_names}"
        claim = claims.get(claim_names.pop())
        assert claim, f"{flag}: its claim is not defined in {RAYJOB}"
        assert claim["apiVersion"] == "v1"
        assert "ReadWriteMany" in claim["spec"]["accessModes"]
        assert claim["spec"]["resources"]["requests"]["storage"]


def test_entrypoint_parses_with_the_cli():
    from gendertune.cli import build_parser
    from gendertune.models.registry import list_models

    args = build_parser().parse_args(entrypoint_argv()[1:])
    assert args.command == "compare"
    assert args.gpu is True
    assert set(args.models) <= set(list_models())


def test_rayjob_runs_ray_260_with_one_image():
    assert cluster_spec()["rayVersion"] == "2.60.0"
    assert Version(cluster_spec()["rayVersion"]) in pinned_ray().specifier
    images = {container["image"] for container in all_containers()}
    assert len(images) == 1, f"head and workers must run the same image, got {images}"


def test_rayjob_token_auth_everywhere():
    assert cluster_spec()["authOptions"]["mode"] == "token"
    for container in all_containers():
        assert env_value(container, "RAY_AUTH_MODE") == "token", container["name"]


def test_rayjob_head_dashboard_is_token_protected_and_not_exposed():
    params = cluster_spec()["headGroupSpec"]["rayStartParams"]
    # The submitter pod and the KubeRay operator call the Jobs API through the head Service, so the
    # dashboard listens on the pod network (127.0.0.1 would leave the job unsubmitted); the token
    # guards it, and the Service must not be published outside the cluster.
    assert params["dashboard-host"] == "0.0.0.0"
    head_service = cluster_spec()["headGroupSpec"].get("headService", {})
    assert head_service.get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert params["num-cpus"] == "0"


def test_every_worker_has_a_gpu_and_may_use_gpu_nodes():
    for group in worker_groups():
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            resources = container["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
            assert resources["requests"] == resources["limits"], container["name"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))


def test_gpu_workers_autoscale():
    assert cluster_spec()["enableInTreeAutoscaling"] is True
    for group in worker_groups():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"]
