"""The cluster configs in cluster/ and the commands of the README's "Run on a cluster" section.

No cloud, Kubernetes or GPU is needed: every file is parsed and checked for what a broken
config gets wrong - GPUs not declared, the head without the `trial_driver` resource, the
dashboard on a public address, storage on a node's local disk, sweep files that do not
exist or do not validate, runtime-env dependencies out of step with pyproject.toml.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
README = ROOT / "README.md"


def cluster_section() -> str:
    """The README's "## Run on a cluster" section, up to the next level-2 heading."""
    text = README.read_text()
    start = text.index("## Run on a cluster")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]
LAUNCHER = CLUSTER / "ray-cluster.aws.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
SERVICEACCOUNT = CLUSTER / "kuberay" / "serviceaccount.yaml"
NETWORKPOLICY = CLUSTER / "kuberay" / "networkpolicy.yaml"
AWS_IAM = CLUSTER / "aws_iam.sh"

CLUSTER_YAMLS = sorted(CLUSTER.rglob("*.yaml"))
LOOPBACK = {"127.0.0.1", "localhost"}
SHARED_STORAGE_SCHEMES = ("s3://", "gs://")
PRIVATE_PORTS = (8265, 6379, 10001)  # dashboard / job API, GCS, Ray client


# --------------------------------------------------------------------------- helpers


def load(path: Path):
    return yaml.safe_load(path.read_text())


def walk(obj):
    """Every (key, value) pair of nested dicts and lists."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key, value
            yield from walk(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from walk(item)


def normalized_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def doc_commands() -> list[str]:
    """Shell commands of the ```bash blocks of the README's cluster section, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", cluster_section(), flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def sweep_invocation(command: str) -> dict | None:
    """{'sweep': file, '--storage': ..., '--name': ...} of a `metakd sweep` command."""
    tokens = shlex.split(command)
    for i in range(len(tokens) - 2):
        if tokens[i] == "metakd" and tokens[i + 1] == "sweep":
            found = {"sweep": tokens[i + 2]}
            rest = tokens[i + 3 :]
            for flag, value in zip(rest, rest[1:]):
                if flag in ("--storage", "--name"):
                    found[flag] = value
            return found
    return None


def option(tokens: list[str], name: str) -> str | None:
    """Value of `--name=value` or `--name value` in a token list."""
    for i, token in enumerate(tokens):
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
        if token == name and i + 1 < len(tokens):
            return tokens[i + 1]
    return None


def assert_valid_sweep(relative: str) -> None:
    path = ROOT / relative
    assert relative.startswith("sweeps/"), f"{relative}: sweep files live in sweeps/"
    assert path.is_file(), f"{relative} is named by a cluster command but does not exist"
    from metakd.config import load_sweep  # raises metakd.config.ConfigError when invalid

    load_sweep(path)


def dockerfile_instructions() -> list[tuple[str, str]]:
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def base_image_ray_version() -> str:
    (base,) = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(gpu|cu\d+)", base)
    assert match, f"FROM {base}: expected an official Ray GPU image rayproject/ray:X.Y.Z-py3NN-gpu"
    return match.group(1)


def ray_cpus(group: dict) -> float:
    """CPUs a KubeRay group's pod advertises to Ray: num-cpus, else the container's CPU limit."""
    if "num-cpus" in group["rayStartParams"]:
        return float(group["rayStartParams"]["num-cpus"])
    (container,) = pod_containers(group)
    value = str(container["resources"]["limits"]["cpu"])
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def pod_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def head_trial_driver_units(ray_start_resources: str) -> float:
    """rayStartParams.resources is a JSON object inside a quoted string: '"{...}"'."""
    return json.loads(json.loads(ray_start_resources))["trial_driver"]


def sweep_files() -> list[Path]:
    return sorted((ROOT / "sweeps").glob("*.yaml"))


# --------------------------------------------------------------------------- every file


def test_cluster_directory_has_every_config():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file()}
    expected = {
        "Dockerfile",
        "ray-cluster.aws.yaml",
        "runtime_env.yaml",
        "aws_iam.sh",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/serviceaccount.yaml",
        "kuberay/networkpolicy.yaml",
    }
    assert expected <= names


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_cluster_yaml_parses_to_mappings(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{path} is empty"
    assert all(isinstance(d, dict) for d in documents)


def test_no_service_is_exposed_outside_the_cluster():
    for path in CLUSTER_YAMLS:
        for document in yaml.safe_load_all(path.read_text()):
            for key, value in walk(document):
                if key in ("type", "serviceType"):
                    assert value not in ("LoadBalancer", "NodePort"), f"{path}: {key}: {value}"
                assert not (key == "enableIngress" and value), f"{path}: enableIngress"
                assert key != "headService", f"{path}: custom head Service; keep KubeRay's ClusterIP one"


def test_storage_in_cluster_files_is_shared():
    storages = []
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            storages += re.findall(r"--storage[= ]+(\S+)", path.read_text())
    assert storages, "no --storage in cluster/: the RayJob entrypoint must name one"
    for storage in storages:
        assert storage.startswith(SHARED_STORAGE_SCHEMES), f"--storage {storage} is node-local"


def test_every_sweep_named_in_cluster_files_exists_and_validates():
    named = set()
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            named |= set(re.findall(r"metakd sweep\s+(\S+\.ya?ml)\b", path.read_text()))
    assert "sweeps/fig4_gamma2.yaml" in named
    for relative in sorted(named):
        assert_valid_sweep(relative)


def test_one_image_everywhere():
    image = load(LAUNCHER)["docker"]["image"]
    assert image.endswith("/metakd:0.1.0")
    cluster_spec = load(RAYCLUSTER)["spec"]
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    assert {c["image"] for g in groups for c in pod_containers(g)} == {image}
    builds = [c for c in doc_commands() if c.startswith("docker build")]
    assert builds and all(option(shlex.split(c), "-t") == image for c in builds)
    assert all(option(shlex.split(c), "-f") == "cluster/Dockerfile" for c in builds)


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_uses_the_ray_gpu_image_of_the_installed_ray():
    version = base_image_ray_version()
    installed = importlib.metadata.version("ray")
    assert version.split(".")[:2] == installed.split(".")[:2], (
        f"cluster image has Ray {version}, this environment Ray {installed}"
    )
    assert load(RAYCLUSTER)["spec"]["rayVersion"] == version


def test_dockerfile_installs_the_project():
    instructions = dockerfile_instructions()
    copied = " ".join(args for keyword, args in instructions if keyword == "COPY")
    assert "pyproject.toml" in copied and "metakd" in copied and "sweeps" in copied
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    assert any(re.search(r"pip install\b[^&;|]*\s\.(\s|$)", run) for run in runs)
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert "TOKENIZERS_PARALLELISM=false" in env


# --------------------------------------------------------------------------- runtime env


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = load(RUNTIME_ENV)
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert env["working_dir"] == "."
    assert env["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert env["env_vars"]["HF_HOME"]


def test_runtime_env_pip_matches_pyproject_dependencies():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {normalized_name(r) for r in pyproject["project"]["dependencies"]}
    listed = [normalized_name(r) for r in load(RUNTIME_ENV)["pip"]]
    assert len(listed) == len(set(listed)), "a package is listed twice"
    assert set(listed) == declared


# --------------------------------------------------------------------------- launcher


def test_launcher_matches_the_ray_cluster_config_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(LAUNCHER)
    validate_config(config)
    validate_config(prepare_config(config))  # with the AWS provider's defaults filled in


def test_launcher_head_runs_trial_drivers_and_no_gpu_work():
    config = load(LAUNCHER)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    assert head["resources"]["trial_driver"] >= 1
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    tokens = shlex.split(start)
    assert "--head" in tokens
    assert option(tokens, "--num-gpus") == "0"
    assert json.loads(option(tokens, "--resources")) == {"trial_driver": head["resources"]["trial_driver"]}


def test_launcher_gpu_worker_types_autoscale():
    config = load(LAUNCHER)
    workers = {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    assert {"gpu_teacher", "gpu_student"} <= set(workers)
    for name, node in workers.items():
        assert node["resources"]["GPU"] >= 1, name
        assert node["min_workers"] == 0 and node["max_workers"] >= 1, name
        # Train workers write checkpoints to S3: workers need their own instance profile.
        assert node["node_config"]["IamInstanceProfile"]["Name"] == "metakd-ray-worker", name
    assert workers["gpu_teacher"]["resources"]["GPU"] == 8
    assert sum(node["max_workers"] for node in workers.values()) <= config["max_workers"]


def test_launcher_dashboard_is_loopback_only():
    config = load(LAUNCHER)
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert option(shlex.split(start), "--dashboard-host") in LOOPBACK
    commands = [c for key, value in walk(config) if key.endswith("commands") for c in value]
    assert not any("0.0.0.0" in command for command in commands)
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", [])
        )
        low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
        for port in PRIVATE_PORTS:
            covered = rule.get("IpProtocol") == "-1" or low == -1 or low <= port <= high
            assert not (world and covered), f"security group opens {port} to the internet"
    for name, node in config["available_node_types"].items():
        assert "SecurityGroupIds" not in node["node_config"], f"{name}: unchecked security group"


def test_launcher_installs_the_project_and_uses_token_auth():
    config = load(LAUNCHER)
    synced = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert synced == ["~/metakd"]
    assert "cd ~/metakd && pip install -e ." in config["setup_commands"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key


# --------------------------------------------------------------------------- KubeRay


def test_raycluster_head_is_cpu_only_clusterip_and_advertises_trial_driver():
    cluster = load(RAYCLUSTER)
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head_trial_driver_units(head["rayStartParams"]["resources"]) >= 1
    for container in pod_containers(head):
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("group_name", ["gpu-teacher", "gpu-student"])
def test_raycluster_gpu_worker_group(group_name):
    spec = load(RAYCLUSTER)["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    group = groups[group_name]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == (8 if group_name == "gpu-teacher" else 1)
    assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == gpus
    assert any(
        t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" and t["effect"] == "NoSchedule"
        for t in pod["tolerations"]
    )


def test_every_ray_pod_mounts_memory_backed_dev_shm():
    spec = load(RAYCLUSTER)["spec"]
    sa = load(SERVICEACCOUNT)["metadata"]["name"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
        assert pod["serviceAccountName"] == sa


def test_rayjob_runs_a_validated_sweep_on_its_own_cluster():
    job = load(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert "clusterSelector" not in spec
    # One cluster spec for both ways of running on Kubernetes.
    assert spec["rayClusterSpec"] == load(RAYCLUSTER)["spec"]
    invocation = sweep_invocation(spec["entrypoint"])
    assert invocation and invocation["--storage"].startswith(SHARED_STORAGE_SCHEMES)
    assert_valid_sweep(invocation["sweep"])


def test_rayjob_runtime_env_matches_the_image_and_runtime_env_yaml():
    runtime_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    (workdir,) = [args for keyword, args in dockerfile_instructions() if keyword == "WORKDIR"]
    assert runtime_env["working_dir"] == workdir
    assert runtime_env["env_vars"] == load(RUNTIME_ENV)["env_vars"]


# --------------------------------------------------------------------------- sweeps vs nodes


def test_sweep_resources_fit_the_cluster_nodes():
    """A trial whose single worker needs more than any node has never starts."""
    launcher = load(LAUNCHER)
    nodes = launcher["available_node_types"]
    max_gpus = max(n["resources"].get("GPU", 0) for n in nodes.values())
    max_cpus = max(n["resources"].get("CPU", 0) for n in nodes.values())
    drivers = nodes[launcher["head_node_type"]]["resources"]["trial_driver"]
    max_pod_cpus = max(ray_cpus(group) for group in load(RAYCLUSTER)["spec"]["workerGroupSpecs"])
    files = sweep_files()
    assert files, "sweeps/ has no sweep files"
    for path in files:
        resources = ((load(path) or {}).get("search") or {}).get("resources") or {}
        for gpu_key in ("gpus_per_worker", "student_gpus_per_worker"):
            assert resources.get(gpu_key, 0) <= max_gpus, f"{path.name}: {gpu_key}"
        assert resources.get("cpus_per_worker", 0) <= min(max_cpus, max_pod_cpus), path.name
        assert resources.get("max_concurrent_trials", 1) <= drivers, path.name


# --------------------------------------------------------------------------- docs


def test_docs_section_heading_and_token_auth():
    text = cluster_section()
    assert text.startswith("## Run on a cluster\n")
    assert "RAY_AUTH_MODE=token" in text and "~/.ray/auth_token" in text


def test_docs_sweep_commands_name_valid_sweeps_and_shared_storage():
    invocations = [(c, sweep_invocation(c)) for c in doc_commands() if "metakd sweep" in c]
    assert len(invocations) >= 2
    text = cluster_section()
    for command, invocation in invocations:
        assert_valid_sweep(invocation["sweep"])
        storage = invocation.get("--storage")
        assert storage, f"no --storage: {command}"
        # S3 / GCS, or an absolute path of a filesystem mounted on every node (NFS); never a
        # relative path, which every node would resolve to its own disk.
        assert storage.startswith(SHARED_STORAGE_SCHEMES) or storage.startswith("/"), command
        if "--name" in invocation:
            assert f"{storage}/{invocation['--name']}" in text, "results path not shown"


def test_docs_job_commands_use_the_tunnel():
    submits = [c for c in doc_commands() if c.startswith("ray job ")]
    assert any(c.startswith("ray job submit") for c in submits)
    for command in submits:
        tokens = shlex.split(command)
        address = option(tokens, "--address")
        assert address in {f"http://{host}:8265" for host in LOOPBACK}, command
        runtime_env = option(tokens, "--runtime-env")
        assert runtime_env is None or (ROOT / runtime_env).is_file(), command


def test_docs_ray_start_head_keeps_dashboard_on_loopback():
    starts = [c for c in doc_commands() if "ray start" in c and "--head" in c]
    assert starts
    for command in starts:
        tokens = shlex.split(command)
        assert option(tokens, "--dashboard-host") in LOOPBACK, command
        assert json.loads(option(tokens, "--resources"))["trial_driver"] >= 1, command


def test_docs_commands_name_files_that_exist():
    paths = {
        token.rstrip(",.;")
        for command in doc_commands()
        for token in shlex.split(command)
        if token.startswith(("cluster/", "sweeps/"))
    }
    assert "cluster/ray-cluster.aws.yaml" in paths and "cluster/kuberay/rayjob.yaml" in paths
    for path in paths:
        assert (ROOT / path).is_file(), path


def test_docs_kubectl_names_match_the_kuberay_objects():
    cluster_name = load(RAYCLUSTER)["metadata"]["name"]
    job_name = load(RAYJOB)["metadata"]["name"]
    commands = doc_commands()
    forwards = [c for c in commands if c.startswith("kubectl port-forward")]
    assert forwards and all(f"svc/{cluster_name}-head-svc " in c for c in forwards)
    secrets = [c for c in commands if "kubectl get secret" in c]
    assert secrets and all(f"kubectl get secret {cluster_name} " in c for c in secrets)
    assert f"kubectl get rayjob {job_name}" in commands
    assert f"kubectl logs -f job/{job_name}" in commands


# --------------------------------------------------------------------------- least privilege


def _run_aws_iam(tmp_path: Path, *args: str) -> list[list[str]]:
    """Run cluster/aws_iam.sh against a fake `aws` that records its calls (no AWS account needed)."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import json, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["sts", "get-caller-identity"]:
    print("123456789012")
elif sys.argv[2:3] in (["get-role"], ["get-instance-profile"]):
    sys.exit(254)  # not there yet: the script creates it
""")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(AWS_IAM), *args], check=True, env=env, capture_output=True, timeout=60)
    return [json.loads(line) for line in log.read_text().splitlines()]


def _policy(calls: list[list[str]], role: str, name: str) -> dict:
    for call in calls:
        if call[:2] == ["iam", "put-role-policy"] and option(call, "--role-name") == role \
                and option(call, "--policy-name") == name:
            return json.loads(option(call, "--policy-document"))
    raise AssertionError(f"no policy {name} put on {role}")


def _actions(statement: dict) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else action


def test_head_role_gets_what_the_autoscaler_needs_and_no_ec2_full_access(tmp_path):
    launcher = load(LAUNCHER)
    region, cluster = launcher["provider"]["region"], launcher["cluster_name"]
    calls = _run_aws_iam(tmp_path, "my-bucket", region)
    attached = [option(c, "--policy-arn") for c in calls if c[:2] == ["iam", "attach-role-policy"]]
    assert not attached, f"managed policies attached: {attached}"
    head = _policy(calls, "metakd-ray-head", "metakd-launch-workers")["Statement"]
    actions = {a for st in head for a in _actions(st)}
    assert not any("*" in a for a in actions), "wildcard actions"
    needed = {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags",
              "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups", "ec2:DescribeImages", "ec2:DescribeKeyPairs",
              "iam:PassRole"}
    assert needed <= actions, needed - actions
    for st in head:
        assert st["Effect"] == "Allow"
        acts = set(_actions(st))
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if acts & {"ec2:TerminateInstances", "ec2:StartInstances", "ec2:StopInstances"}:
            # only this cluster's instances, by the tag Ray puts on every node it launches
            assert st["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == cluster
        if "ec2:RunInstances" in acts and any(":instance/" in r for r in resources):
            assert st["Condition"]["StringEquals"]["aws:RequestTag/ray-cluster-name"] == cluster
        if "ec2:RunInstances" in acts:
            assert all(f":{region}:" in r for r in resources) and "*" not in resources
        if "iam:PassRole" in acts:
            assert resources == ["arn:aws:iam::123456789012:role/metakd-ray-worker"]
        if not all(a.startswith("ec2:Describe") for a in acts):
            assert resources != ["*"], st
    for role in ("metakd-ray-head", "metakd-ray-worker"):
        s3 = _policy(calls, role, "metakd-results-bucket")["Statement"]
        resources = {r for st in s3 for r in ([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])}
        assert resources == {"arn:aws:s3:::my-bucket", "arn:aws:s3:::my-bucket/*"}


def test_networkpolicy_admits_the_job_api_only_from_the_operator_and_submitters():
    policy = load(NETWORKPOLICY)
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    rules = policy["spec"]["ingress"]
    assert all(rule.get("from") for rule in rules), "a rule without 'from' admits every source"
    for rule in rules:
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule["from"]
        if not ports:  # every port: only the Ray pods of this namespace
            assert peers == [{"podSelector": {"matchExpressions": [{"key": "ray.io/node-type", "operator": "Exists"}]}}]
            continue
        assert ports == {8265}
        operator = [p for p in peers if "namespaceSelector" in p]
        assert operator and all(p["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
                                for p in operator)
        namespaces = {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in operator}
        assert all(f"--namespace {ns}" in README.read_text() for ns in namespaces), "operator installed elsewhere"
        jobs = {p["podSelector"]["matchLabels"].get("batch.kubernetes.io/job-name") for p in peers}
        assert load(RAYJOB)["metadata"]["name"] in jobs
        assert all(p.get("podSelector", {}).get("matchLabels") for p in peers), "an empty selector admits all"
    assert "kubectl apply -f cluster/kuberay/networkpolicy.yaml" in doc_commands()
