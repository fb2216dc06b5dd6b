"""The deployment artifacts: Dockerfile, docker-compose.yml and deploy/ (kustomize).

Each is checked by the tool made for it (hadolint, check-jsonschema with the
bundled compose-spec schema, kubernetes-validate with its bundled schemas: none
needs the network), rendered with kustomize where a kustomize or kubectl binary
is at hand, and held to the facts Hearth relies on: probe paths, the non-root
user, the GPU reservation, the KEDA trigger on the right stream and group.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from hearth.settings import Settings
from models.registry import MODEL_ID_PATTERN, PACKAGED_EMBEDDING_ID
from workers.protocol import CONSUMER_GROUP, Keys

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
GPU = DEPLOY / "overlays" / "gpu"
# The oldest Kubernetes the manifests are meant for (PodDisruptionBudget's
# unhealthyPodEvictionPolicy is on by default from 1.27).
OLDEST_KUBERNETES = "1.27.0"
# API groups kubernetes-validate has schemas for; anything else is a CRD.
CORE_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io"}

Doc = dict[str, Any]


# ------------------------------------------------------------------ helpers ----


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: install the test extra (pip install -e '.[test]')")
    return str(path)


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def settings_variables() -> set[str]:
    names = {f"HEARTH_{name.upper()}" for name in Settings.model_fields}
    return (names - {"HEARTH_REDIS_URL"}) | {"REDIS_URL"}


def duration_s(text: str) -> float:
    """Compose durations: '75s', '10m', '1m30s'."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for word, rest in self.instructions if word == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for rest in self.all("ENV"):
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                values[key] = value
        return values

    def args(self) -> dict[str, str]:
        return dict(arg.partition("=")[::2] for arg in self.all("ARG"))


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs and the stages, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


def yaml_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> Doc:
    loaded: Doc = yaml.safe_load(COMPOSE.read_text())
    return loaded


def kustomizations() -> list[Path]:
    return sorted(path.parent for path in DEPLOY.rglob("kustomization.yaml"))


def patch_files() -> set[Path]:
    patches: set[Path] = set()
    for folder in kustomizations():
        spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
        for patch in spec.get("patches", []):
            if "path" in patch:
                patches.add((folder / patch["path"]).resolve())
    return patches


def manifest_files() -> Iterator[Path]:
    """Every Kubernetes object file under deploy/ (not kustomizations, not patches)."""
    patches = patch_files()
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name != "kustomization.yaml" and path.resolve() not in patches:
            yield path


def is_core(doc: Doc) -> bool:
    api_version = str(doc["apiVersion"])
    group = api_version.split("/")[0] if "/" in api_version else ""
    return group in CORE_GROUPS


def objects() -> dict[tuple[str, str], Doc]:
    """deploy/'s objects by (kind, name)."""
    found: dict[tuple[str, str], Doc] = {}
    for path in manifest_files():
        for doc in yaml_docs(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} is defined twice"
            found[key] = doc
    return found


def renderer() -> list[str] | None:
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    return None


def render(folder: Path) -> list[Doc]:
    command = renderer()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed; the files are checked one by one")
    result = run(*command, str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate(paths: list[Path], *version: str) -> None:
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", *version, *map(str, paths))
    assert result.returncode == 0, result.stdout + result.stderr


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def container(doc: Doc, name: str) -> Doc:
    (found,) = [c for c in pod_spec(doc)["containers"] if c["name"] == name]
    return found


def config_map() -> dict[str, str]:
    data: dict[str, str] = objects()[("ConfigMap", "hearth-config")]["data"]
    return data


def image_uid() -> int:
    _, stages = dockerfile()
    user = stages[-1].all("USER")[-1]
    return int(user.split(":")[0])


# --------------------------------------------------------------- Dockerfile ----


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), "--no-color", "--failure-threshold", "warning", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = run(tool("hadolint"), "--no-color", "--failure-threshold", "warning", str(bad))
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag


def test_dockerfile_is_multi_stage_with_a_venv_built_apart() -> None:
    global_args, stages = dockerfile()
    assert global_args.get("BASE_IMAGE", "").startswith("python:3.11-slim")
    assert [stage.image for stage in stages] == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    builder, runtime = stages
    assert builder.name == "builder"
    assert any("python -m venv /opt/venv" in run_ for run_ in builder.all("RUN"))
    assert "COPY --from=builder /opt/venv /opt/venv" in [f"COPY {c}" for c in runtime.all("COPY")]
    assert runtime.env()["PATH"].startswith("/opt/venv/bin:")


def test_torch_is_installed_first_cpu_by_default_at_the_makefiles_version() -> None:
    _, (builder, _) = dockerfile()
    args = builder.args()
    makefile = (ROOT / "Makefile").read_text()
    (version,) = re.findall(r"^TORCH_VERSION := (\S+)$", makefile, flags=re.M)
    assert args["TORCH_VERSION"] == version
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    installs = [r for r in builder.all("RUN") if "pip install" in r]
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in installs[0]
    assert "pip install --no-cache-dir ." in installs[1]


def test_runtime_stage_runs_as_a_non_root_user_with_the_api_by_default() -> None:
    _, stages = dockerfile()
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users, "the runtime stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert image_uid() > 0
    assert runtime.all("EXPOSE") == ["8000"]
    assert runtime.all("CMD") == ['["hearth", "api", "--host", "0.0.0.0", "--port", "8000"]']
    assert not runtime.all("ENTRYPOINT")  # so that `hearth worker` is a whole command


def test_healthcheck_asks_healthz_with_python_not_curl() -> None:
    _, stages = dockerfile()
    (check,) = stages[-1].all("HEALTHCHECK")
    assert '"python", "-c"' in check
    assert "http://127.0.0.1:8000/healthz" in check
    assert "curl" not in check and "wget" not in check


def test_runtime_environment_is_offline_with_state_on_the_volume() -> None:
    _, stages = dockerfile()
    runtime = stages[-1]
    env = runtime.env()
    assert env["HF_HUB_OFFLINE"] == "1"
    (volume,) = runtime.all("VOLUME")
    (data,) = yaml.safe_load(volume)
    assert env["HEARTH_STATE_DIR"] == data
    assert env["HEARTH_MODELS_DIR"].startswith(data + "/")
    assert set(env) & settings_variables() == {"HEARTH_STATE_DIR", "HEARTH_MODELS_DIR"}


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def copied_sources() -> list[str]:
    _, (builder, _) = dockerfile()
    sources: list[str] = []
    for rest in builder.all("COPY"):
        assert not rest.startswith("--from"), rest
        sources += rest.split()[:-1]
    return sources


def test_dockerignore_keeps_out_the_venv_git_and_caches_but_not_what_is_copied() -> None:
    patterns = dockerignore_patterns()
    for needed in (".venv", ".git", "**/__pycache__", ".pytest_cache", "tests"):
        assert needed in patterns
    for source in copied_sources():
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        for pattern in patterns:
            assert not fnmatch.fnmatch(source, pattern.removeprefix("**/")), (source, pattern)


def test_the_wheel_the_image_installs_holds_every_package_file(tmp_path: Path) -> None:
    """The image installs Hearth with `pip install .` from what the Dockerfile
    copies: no file of the packages (HTML pages, say) may be left behind."""
    source = tmp_path / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in copied_sources():
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    result = run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
        "--no-build-isolation", "--wheel-dir", str(wheels), str(source),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = wheels.glob("hearth-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    packages = [name for name in copied_sources() if (ROOT / name).is_dir()]
    expected = {
        path.relative_to(source).as_posix()
        for package in packages
        for path in (source / package).rglob("*")
        if path.is_file()
    }
    assert expected, "no package files were copied"
    assert not expected - packaged, f"missing from the wheel: {sorted(expected - packaged)}"


# ------------------------------------------------------------------ compose ----


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_jsonschema_does_catch_a_bad_gpu_reservation(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text(
        "services:\n  w:\n    image: x\n    deploy:\n      resources:\n        reservations:\n"
        "          devices:\n            - driver: nvidia\n              capabilities: gpu\n"
    )
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
    assert result.returncode != 0
    assert "capabilities" in result.stdout


def hearth_services() -> dict[str, Doc]:
    services: dict[str, Doc] = compose()["services"]
    return {name: s for name, s in services.items() if s.get("image") == "hearth:local"}


def test_compose_has_redis_with_aof_a_healthcheck_and_a_volume() -> None:
    redis = compose()["services"]["redis"]
    assert redis["image"] == "redis:7"  # lag-based scaling reads XINFO GROUPS' lag: Redis 7
    assert "--appendonly yes" in " ".join(redis["command"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    (volume,) = redis["volumes"]
    assert volume.split(":")[0] in compose()["volumes"]


def test_compose_services_share_one_image_built_from_the_dockerfile() -> None:
    services = hearth_services()
    assert {"api", "worker", "worker-cpu", "models-demo"} <= set(services)
    builds = [s["build"] for s in services.values()]
    assert all(build == builds[0] for build in builds)
    assert builds[0]["context"] == "."
    _, (builder, _) = dockerfile()
    assert set(builds[0].get("args", {})) <= set(builder.args())


def test_compose_api_waits_for_a_healthy_redis_and_is_checked_on_readyz() -> None:
    api = compose()["services"]["api"]
    assert api["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert api["depends_on"]["models-demo"] == {"condition": "service_completed_successfully"}
    assert api["ports"] == ["8000:8000"]
    assert api["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    check = " ".join(api["healthcheck"]["test"])
    assert "/readyz" in check or "/healthz" in check


def test_compose_gpu_worker_reserves_an_nvidia_gpu_by_default() -> None:
    worker = compose()["services"]["worker"]
    assert worker["command"] == ["hearth", "worker"]
    assert "profiles" not in worker
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device.get("count") in (1, "all")
    assert worker["environment"]["HEARTH_DEVICE"] == "cuda"


def test_compose_cpu_worker_comes_with_the_cpu_profile() -> None:
    worker = compose()["services"]["worker-cpu"]
    assert worker["profiles"] == ["cpu"]
    assert worker["command"] == ["hearth", "worker"]
    assert worker["environment"]["HEARTH_DEVICE"] == "cpu"
    assert "deploy" not in worker


def test_compose_workers_drain_and_skip_the_images_http_healthcheck() -> None:
    services = compose()["services"]
    for name in ("worker", "worker-cpu"):
        worker = services[name]
        assert worker["healthcheck"] == {"disable": True}, name
        assert duration_s(worker["stop_grace_period"]) >= 300, name
        assert worker["depends_on"]["redis"] == {"condition": "service_healthy"}, name
        assert worker["environment"]["REDIS_URL"] == "redis://redis:6379/0", name


def test_compose_model_store_volume_is_shared_and_demo_models_are_written() -> None:
    _, stages = dockerfile()
    data = stages[-1].env()["HEARTH_STATE_DIR"]
    services = hearth_services()
    mounts = {name: service["volumes"] for name, service in services.items()}
    assert all(volumes == [f"hearth-data:{data}"] for volumes in mounts.values()), mounts
    assert "hearth-data" in compose()["volumes"]
    assert services["models-demo"]["command"] == ["hearth", "models", "demo"]
    assert services["models-demo"]["restart"] == "no"


def test_compose_sets_only_real_settings() -> None:
    for name, service in hearth_services().items():
        unknown = set(service["environment"]) - settings_variables()
        assert not unknown, f"{name}: {unknown}"


# --------------------------------------------------------------- kubernetes ----


def test_every_kustomization_lists_files_that_exist() -> None:
    folders = kustomizations()
    assert {BASE, GPU, DEPLOY / "redis"} <= set(folders)
    for folder in folders:
        spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
        assert spec["kind"] == "Kustomization"
        listed = list(spec.get("resources", []))
        listed += [patch["path"] for patch in spec.get("patches", []) if "path" in patch]
        for generator in spec.get("secretGenerator", []) + spec.get("configMapGenerator", []):
            listed += generator.get("envs", []) + generator.get("files", [])
        for entry in listed:
            target = folder / entry
            assert target.is_file() or (target / "kustomization.yaml").is_file(), (folder, entry)


def test_every_core_manifest_passes_kubernetes_validate_strict() -> None:
    core: list[Path] = []
    for path in manifest_files():
        docs = yaml_docs(path)
        if all(is_core(doc) for doc in docs):
            core.append(path)
        else:
            assert {doc["kind"] for doc in docs} == {"ScaledObject"}, path
    assert len(core) >= 10
    validate(core)
    validate(core, "--kubernetes-version", OLDEST_KUBERNETES)


def test_kubernetes_validate_does_catch_an_unknown_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  bogus: 1\n")
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", str(bad))
    assert result.returncode != 0
    assert "bogus" in result.stdout + result.stderr


@pytest.mark.parametrize("folder", kustomizations(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_each_kustomization_renders_and_its_output_validates(folder: Path, tmp_path: Path) -> None:
    docs = render(folder)
    assert docs
    core = [doc for doc in docs if is_core(doc)]
    assert {doc["kind"] for doc in docs if not is_core(doc)} <= {"ScaledObject"}
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(core))
    validate([rendered])
    validate([rendered], "--kubernetes-version", OLDEST_KUBERNETES)


def test_configmap_sets_redis_and_only_real_settings() -> None:
    data = config_map()
    assert set(data) - settings_variables() == {"REDIS_ADDRESS"}
    url = urlsplit(data["REDIS_URL"])
    assert url.scheme in ("redis", "rediss")
    # KEDA's scaler reads host:port; it must name the same Redis.
    assert data["REDIS_ADDRESS"] == f"{url.hostname}:{url.port or 6379}"


def test_secret_holds_marked_placeholders_for_the_api_keys_and_webhook_secret() -> None:
    spec = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (generator,) = spec["secretGenerator"]
    assert generator["name"] == "hearth-secrets"
    values: dict[str, str] = {}
    for env_file in generator["envs"]:
        for line in (BASE / env_file).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                values[key] = value
    assert set(values) == {"HEARTH_API_KEYS", "HEARTH_WEBHOOK_SECRET"}
    assert all("REPLACE" in value for value in values.values())


def test_api_deployment_probes_healthz_and_readyz_on_its_port() -> None:
    api = objects()[("Deployment", "hearth-api")]
    box = container(api, "api")
    assert box["command"] == ["hearth", "api", "--host", "0.0.0.0", "--port", "8000"]
    (port,) = box["ports"]
    assert port["containerPort"] == 8000
    assert box["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert box["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert "replicas" not in api["spec"]  # the HPA owns it


def test_api_service_hpa_and_pdb_point_at_the_api_pods() -> None:
    found = objects()
    api = found[("Deployment", "hearth-api")]
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    service = found[("Service", "hearth-api")]
    assert service["spec"]["selector"] == pod_labels
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == container(api, "api")["ports"][0]["name"]
    hpa = found[("HorizontalPodAutoscaler", "hearth-api")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "hearth-api",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = found[("PodDisruptionBudget", "hearth-api")]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == pod_labels
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_worker_deployment_drains_and_has_no_http_probe() -> None:
    worker = objects()[("Deployment", "hearth-worker")]
    assert pod_spec(worker)["terminationGracePeriodSeconds"] >= 300
    box = container(worker, "worker")
    assert box["command"] == ["hearth", "worker"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert "httpGet" not in box.get(probe, {}), "a worker serves no HTTP"
    env = {item["name"]: item for item in box["env"]}
    assert env["HEARTH_WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "replicas" not in worker["spec"]  # KEDA owns it
    # Prometheus finds each worker's metrics where the worker serves them.
    port = env["HEARTH_WORKER_METRICS_PORT"]["value"]
    assert {"name": "metrics", "containerPort": int(port), "protocol": "TCP"} in box["ports"]
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == port


def test_pods_run_as_the_images_user_with_limits_and_writable_scratch() -> None:
    _, stages = dockerfile()
    home = stages[-1].env()["HOME"]
    models_dir = config_map()["HEARTH_MODELS_DIR"]
    workloads = [d for d in objects().values() if d["kind"] in ("Deployment", "StatefulSet", "Job")]
    assert len(workloads) >= 4
    for doc in workloads:
        spec = pod_spec(doc)
        name = doc["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for box in spec["containers"]:
            assert {"cpu", "memory"} <= set(box["resources"]["requests"]), name
            assert "memory" in box["resources"]["limits"], name
            security = box["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            if box["image"] != "hearth":
                continue
            assert spec["securityContext"]["runAsUser"] == image_uid(), name
            mounts = {mount["mountPath"]: mount for mount in box["volumeMounts"]}
            if security.get("readOnlyRootFilesystem"):
                assert {"/tmp", home} <= set(mounts), name
            assert mounts[models_dir]["name"] == "models", name
            (models,) = [v for v in spec["volumes"] if v["name"] == "models"]
            assert models["persistentVolumeClaim"]["claimName"] == "hearth-models", name


def test_scaledobject_scales_the_workers_on_the_consumer_groups_lag() -> None:
    found = objects()
    scaled = found[("ScaledObject", "hearth-worker")]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) in found
    assert target["name"] == "hearth-worker"
    # Never 0: the API's readiness needs a live worker, so with none the lag could not grow.
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    data = config_map()
    keys = Keys(data["HEARTH_NAMESPACE"])
    worker_env = container(found[("Deployment", "hearth-worker")], "worker")["envFrom"]
    assert {"configMapRef": {"name": "hearth-config"}} in worker_env
    triggers = scaled["spec"]["triggers"]
    assert triggers
    models: set[str] = set()
    for trigger in triggers:
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == CONSUMER_GROUP
        assert int(meta["lagCount"]) >= 1
        assert "pendingEntriesCount" not in meta and "streamLength" not in meta
        assert meta["addressFromEnv"] in data
        match = re.fullmatch(r"(.+):stream:\{(.+)\}", meta["stream"])
        assert match, meta["stream"]
        assert MODEL_ID_PATTERN.match(match[2])
        assert meta["stream"] == keys.stream(match[2])
        models.add(match[2])
    assert PACKAGED_EMBEDDING_ID in models
    assert keys.stream(PACKAGED_EMBEDDING_ID) == "hearth:stream:{all-minilm-l6-v2}"


def test_gpu_overlay_patch_asks_for_a_gpu_on_gpu_nodes() -> None:
    spec = yaml.safe_load((GPU / "kustomization.yaml").read_text())
    assert spec["resources"] == ["../../base"]
    (patch_path,) = [patch["path"] for patch in spec["patches"]]
    patch = yaml.safe_load((GPU / patch_path).read_text())
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", "hearth-worker")
    box = container(patch, "worker")
    assert box["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "HEARTH_DEVICE", "value": "cuda"} in box["env"]
    assert pod_spec(patch)["nodeSelector"] or pod_spec(patch)["tolerations"]


def test_gpu_overlay_renders_a_gpu_worker_beside_an_unchanged_api() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(GPU)}
    worker = container(docs[("Deployment", "hearth-worker")], "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {item["name"]: item for item in worker["env"]}
    assert env["HEARTH_DEVICE"]["value"] == "cuda"
    assert "HEARTH_WORKER_NAME" in env  # the patch added to the base's env, kept the rest
    assert pod_spec(docs[("Deployment", "hearth-worker")])["terminationGracePeriodSeconds"] >= 300
    api = container(docs[("Deployment", "hearth-api")], "api")
    assert "nvidia.com/gpu" not in api["resources"]["limits"]
    assert api["image"] != worker["image"]
    secret_names = {name for kind, name in docs if kind == "Secret"}
    for box in (api, worker):
        refs = {e["secretRef"]["name"] for e in box["envFrom"] if "secretRef" in e}
        assert refs and refs <= secret_names  # the generated, hashed name


def test_redis_statefulset_keeps_an_aof_on_its_own_volume() -> None:
    redis = objects()[("StatefulSet", "hearth-redis")]
    box = container(redis, "redis")
    assert box["image"] == "redis:7"
    args = " ".join(box["args"])
    assert "--appendonly yes" in args
    assert "--maxmemory-policy noeviction" in args
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in box["volumeMounts"]
