"""The sharded Kubernetes layout (deploy/k8s-shards): one worker Deployment and one KEDA
ScaledObject per shard, each on its shard's jobs queue; the gateway sees the shard map."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from recfleet.shared.settings import Settings
from recfleet.shared.topology import jobs_queue

ROOT = Path(__file__).resolve().parent.parent
SHARDS = ROOT / "deploy" / "k8s-shards"
SCHEMAS = ROOT / "deploy" / "k8s" / "schemas"


def _render(n: int) -> str:
    return subprocess.run(
        [str(SHARDS / "render.sh"), str(n)], check=True, capture_output=True, text=True
    ).stdout


def _kustomized() -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(SHARDS)], check=True, capture_output=True, text=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_committed_layout_is_what_render_writes_for_two_shards() -> None:
    assert (SHARDS / "shards.yaml").read_text() == _render(2)
    three = [d for d in yaml.safe_load_all(_render(3)) if d]
    assert [d["metadata"]["name"] for d in three if d["kind"] == "ScaledObject"] == [
        f"recfleet-worker-shard-{k}" for k in range(3)
    ]


def test_each_shard_has_its_workers_and_its_scaler_on_its_queue() -> None:
    docs = _kustomized()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scalers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    assert "recfleet-worker" not in deployments and "recfleet-worker" not in scalers
    settings = Settings()
    for k in range(2):
        name = f"recfleet-worker-shard-{k}"
        pod = deployments[name]["spec"]["template"]
        command = pod["spec"]["containers"][0]["command"]
        assert command[-2:] == ["--shard", str(k)]
        selector = deployments[name]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        assert selector["recfleet.io/shard"] == str(k)
        scaler = scalers[name]["spec"]
        assert scaler["scaleTargetRef"]["name"] == name
        assert scaler["triggers"][0]["metadata"]["queueName"] == jobs_queue(settings, k, 2)
    gateway = deployments["recfleet-gateway"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in gateway["containers"][0]["volumeMounts"]}
    assert mounts["artifacts"]["mountPath"] == "/artifacts" and mounts["artifacts"]["readOnly"]


def test_shard_manifests_match_their_schemas() -> None:
    scaled = jsonschema.Draft202012Validator(
        json.loads((SCHEMAS / "scaledobject-keda.sh-v1alpha1.json").read_text())
    )
    version = kubernetes_validate.utils.latest_version()
    for doc in _kustomized():
        if doc["kind"] == "ScaledObject":
            assert not [e.message for e in scaled.iter_errors(doc)]
        elif not doc["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(doc, version, strict=True)


def test_compose_example_runs_one_worker_service_per_shard() -> None:
    import importlib.resources

    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    override = yaml.safe_load((ROOT / "compose.shards.yml").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert not [e.message for e in validator.iter_errors(override)]
    services = override["services"]
    assert services["worker"]["profiles"] == ["unsharded"]
    for k in range(2):
        shard = services[f"worker-shard-{k}"]
        assert shard["command"][-2:] == ["--shard", str(k)]
        assert shard["environment"]["RECFLEET_ARTIFACTS"] == "/artifacts/demo-shards"
        assert shard["depends_on"]["artifacts"]["condition"] == "service_completed_successfully"
    gateway = services["gateway"]
    assert gateway["environment"]["RECFLEET_ARTIFACTS"] == "/artifacts/demo-shards"
    assert "artifacts:/artifacts:ro" in gateway["volumes"]
    assert (
        "recfleet artifacts shard /artifacts/demo --shards 2" in services["artifacts"]["command"][2]
    )
