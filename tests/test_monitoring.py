"""Monitoring against a real Prometheus: every dashboard query and alert rule returns data.

A private Prometheus (Debian's ``prometheus``, own config, port and storage) scrapes a
gateway and two worker processes every second and loads the repository's rules. Three
batches run through the fleet: two of known users (the second is compared with the
first) and a surge of users the model has never seen. Then every query of every Grafana
panel and every rule is evaluated through the HTTP API.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner

from recfleet.cli.client import submit, wait
from recfleet.cli.fleet import LocalFleet
from recfleet.cli.main import cli
from recfleet.shared.settings import Settings
from tests.support.net import free_port
from tests.support.settings import make_settings, purge

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "recfleet.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "recfleet.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rules" / "tests" / "recfleet_test.yml"
# Grafana fills these in from the time range; a query sent straight to Prometheus needs
# concrete values. The windows are wide enough to hold the whole test run.
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "1h"}
SURGE_BASE = 10**12  # user ids far above any the artifacts know
SCRAPE_S = 1


# --- Prometheus ------------------------------------------------------------------------


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed; ./run test installs Debian's package")
    return path


def promql(url: str, expr: str) -> list[dict[str, Any]]:
    """Evaluate an instant query. Fails the test when Prometheus refuses the expression."""
    resp = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        return [{"metric": {}, "value": result}]
    return list(result)


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@dataclass
class Observed:
    prometheus: str
    gateway: str
    settings: Settings
    log_dir: Path
    normal: str  # batch of known users
    resample: str  # another batch of known users, compared with ``normal``
    surge: str  # batch of unknown users


def _prometheus_config(settings: Settings, workers: int) -> dict[str, Any]:
    # The job names of deploy/prometheus/prometheus.yml, which the rules rely on.
    return {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "gateway",
                "static_configs": [{"targets": [f"127.0.0.1:{settings.api_port}"]}],
            },
            {
                "job_name": "worker",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{settings.metrics_port + i}" for i in range(workers)]}
                ],
            },
        ],
    }


@pytest.fixture(scope="module")
def management_api(services: None) -> None:
    """RabbitMQ's management API, which the gateway reads unacked counts from."""

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", 15672), timeout=2):
                return True
        except OSError:
            return False

    if not answers():
        subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_management"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        wait_until("the RabbitMQ management API on :15672", answers, 60)


@pytest.fixture(scope="module")
def prometheus_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[dict[str, Any]], str]]:
    """Starts a private Prometheus with a given config; returns its URL. Stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: dict[str, Any]) -> str:
        work = tmp_path_factory.mktemp("prometheus")
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        with (work / "prometheus.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        prometheus_binary(),
                        f"--config.file={work / 'prometheus.yml'}",
                        f"--storage.tsdb.path={work / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert procs[-1].poll() is None, (work / "prometheus.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("Prometheus to be ready", ready, 60)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_batch(client: httpx.Client, user_ids: list[int]) -> str:
    sub = submit(client, user_ids, chunk=len(user_ids))
    (status,) = wait(client, sub.batch_ids, sub.users, show=False)
    assert status["state"] == "done", status
    # A small batch takes well under a scrape interval: leave Prometheus two scrapes to
    # see each step, or the steps merge into one sample and rates see nothing.
    time.sleep(SCRAPE_S * 2.5)
    return sub.batch_ids[0]


def _exercise_the_gateway(client: httpx.Client) -> None:
    """Reads, client errors and one like, so every API and CTR panel has something to show."""
    assert client.get("/api/playlist/1").status_code == 200
    assert client.get("/api/batches/no-such-batch").status_code == 404
    assert client.post("/api/playlist/beta_recommend/", json={"user_ids": []}).status_code == 422
    shown = client.post("/api/impressions", json={"user_id": 1})
    assert shown.status_code == 201, shown.text
    impression = shown.json()
    like = {
        "like_id": str(uuid.uuid4()),
        "impression_id": impression["impression_id"],
        "user_id": 1,
        "playlist_id": impression["playlists"][0],
    }
    assert client.post("/api/feedback", json=like).status_code == 201


@pytest.fixture(scope="module")
def observed(
    management_api: None,
    small_artifacts: Path,
    database_url: str,
    prometheus_server: Callable[[dict[str, Any]], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Observed]:
    settings = make_settings(
        small_artifacts, database_url=database_url, log_json=True, log_level="DEBUG"
    )
    log_dir = tmp_path_factory.mktemp("fleet-logs")
    prom = prometheus_server(_prometheus_config(settings, workers=2))
    try:
        with LocalFleet(settings, processes=2, log_dir=log_dir) as fleet:
            fleet.wait_workers_consuming()
            # Rates need a sample from before the batches: a batch of 3 000 users takes
            # less than a scrape interval or two.
            wait_until(
                "Prometheus to scrape the gateway and both workers twice",
                lambda: len(finite_values(promql(prom, "count_over_time(up[1m]) >= 2"))) == 3,
                60,
            )
            with httpx.Client(base_url=fleet.base_url, timeout=60) as client:
                normal = _run_batch(client, list(range(0, 3000)))
                resample = _run_batch(client, list(range(3000, 6000)))
                _exercise_the_gateway(client)
                time.sleep(SCRAPE_S * 2.5)
                surge = _run_batch(client, [SURGE_BASE + i for i in range(3000)])

            def scraped(expr: str) -> Callable[[], bool]:
                return lambda: bool(promql(prom, expr))

            # The gateway's monitor and the CTR refresher run on their own clocks.
            for expr in (
                f'recfleet_drift_cold_fraction{{batch_id="{surge}"}} == 1',
                "recfleet_feedback_ctr",
                f'recfleet_queue_messages_unacked{{queue="{settings.jobs_queue}"}}',
                f'recfleet_queue_messages_unacked{{queue="{settings.dead_letter_queue}"}}',
                "recfleet:cold_fraction:30m",
            ):
                wait_until(f"Prometheus to see {expr}", scraped(expr), 150)
            yield Observed(prom, fleet.base_url, settings, log_dir, normal, resample, surge)
    finally:
        purge(settings)


# --- dashboards ------------------------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, expr) of every target of every panel, Grafana macros filled in."""
    out = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for macro, value in GRAFANA_MACROS.items():
                    expr = expr.replace(macro, value)
                out.append((dash["uid"], panel["title"], expr))
    return out


def test_every_dashboard_query_returns_data(observed: Observed) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 40
    empty = []
    for uid, title, expr in queries:
        assert "$" not in expr, f"{uid} / {title}: unknown macro in {expr}"
        if not finite_values(promql(observed.prometheus, expr)):
            empty.append(f"{uid} / {title}: {expr}")
    assert not empty, "queries without a finite value:\n" + "\n".join(empty)


# --- rules -----------------------------------------------------------------------------

_COMPARISON = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?[-+]?[0-9.]+(e[-+]?[0-9]+)?\s*$")
_MATCHING = re.compile(r"^\s*(on|ignoring)\s*\([^)]*\)\s*(group_(left|right)\s*(\([^)]*\))?)?")


def split_top_level(expr: str, operators: tuple[str, ...] = ("and", "or", "unless")) -> list[str]:
    """Split an expression on set operators outside brackets, quotes and label matchers."""
    parts, depth, start, i, quote = [], 0, 0, 0, ""
    while i < len(expr):
        ch = expr[i]
        if quote:
            quote = "" if ch == quote and expr[i - 1] != "\\" else quote
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            for op in operators:
                if re.match(rf"\s{op}\s", expr[i - 1 : i + len(op) + 1]) and i > 0:
                    parts.append(expr[start:i])
                    start = i + len(op)
                    i += len(op) - 1
                    break
        i += 1
    parts.append(expr[start:])
    return [_MATCHING.sub("", p).strip() for p in parts]


def signal_of(operand: str) -> str:
    """An alert operand without its threshold: ``max(x) > 0.2`` -> ``max(x)``."""
    return _COMPARISON.sub("", operand).strip()


def test_split_and_strip_alert_expressions() -> None:
    expr = 'max by (q) (m{q!~".*and.*"}) > 0\n  and on (q)\n  max by (q) (n) == 0'
    assert [signal_of(p) for p in split_top_level(expr)] == [
        'max by (q) (m{q!~".*and.*"})',
        "max by (q) (n)",
    ]
    assert signal_of("(sum(x) or vector(0)) > 1e-3") == "(sum(x) or vector(0))"


def load_rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed; ./run test installs Debian's prometheus")
    proc = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in proc.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """Thresholds and ``for`` durations, on synthetic series (rules/tests/recfleet_test.yml)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed; ./run test installs Debian's prometheus")
    proc = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_rule_evaluates_and_each_alert_signal_returns_data(observed: Observed) -> None:
    prom = observed.prometheus
    rules = load_rules()
    # Prometheus itself evaluates the loaded rules every second: all must be healthy.
    loaded = httpx.get(f"{prom}/api/v1/rules", timeout=30).json()["data"]["groups"]
    health = {r["name"]: (r["health"], r.get("lastError")) for g in loaded for r in g["rules"]}
    assert len(health) == len(rules)
    assert all(h == "ok" for h, _ in health.values()), health

    empty = []
    for rule in rules:
        expr = " ".join(rule["expr"].split())
        name = rule.get("alert") or rule["record"]
        promql(prom, expr)  # the whole rule parses and evaluates
        signals = [expr] if "record" in rule else [signal_of(p) for p in split_top_level(expr)]
        for signal in signals:
            if not finite_values(promql(prom, signal)):
                empty.append(f"{name}: {signal}")
    assert not empty, "rule signals without a finite value:\n" + "\n".join(empty)


def test_the_cold_surge_fires_the_cold_and_drift_alerts(observed: Observed) -> None:
    def alerts() -> dict[str, str]:
        body = httpx.get(f"{observed.prometheus}/api/v1/alerts", timeout=30).json()
        return {a["labels"]["alertname"]: a["state"] for a in body["data"]["alerts"]}

    def fired() -> bool:
        now = alerts()
        return all(
            now.get(name) == "firing"
            for name in ("RecfleetBatchColdFractionHigh", "RecfleetPredictionDrift")
        )

    wait_until("the cold and drift alerts", fired, 30)
    # A third of everything ranked in the window was cold; that alert waits 15 min.
    (sample,) = promql(observed.prometheus, "recfleet:cold_fraction:30m")
    assert float(sample["value"][1]) == pytest.approx(1 / 3, abs=0.05)
    now = alerts()
    assert now.get("RecfleetColdFractionHigh") == "pending"
    assert not {"RecfleetGatewayTargetDown", "RecfleetWorkerTargetDown"} & set(now)


# --- drift through the API, the CLI and the metrics ----------------------------------------


def test_a_cold_surge_moves_the_drift_figures_and_a_resample_does_not(observed: Observed) -> None:
    with httpx.Client(base_url=observed.gateway, timeout=30) as client:
        same = client.get(f"/api/batches/{observed.resample}/drift").json()
        surge = client.get(f"/api/batches/{observed.surge}/drift").json()
        vs_first = client.get(
            f"/api/batches/{observed.surge}/drift", params={"reference": observed.normal}
        ).json()
        missing = client.get(f"/api/batches/{observed.surge}/drift?reference=nope")

    # By default each batch is compared with the one that finished before it.
    assert same["reference"]["batch_id"] == observed.normal
    assert same["reference_source"] == "previous"
    assert same["batch"]["cold_fraction"] < 0.05
    assert same["chi_square"]["p_value"] > 1e-6 and same["chi_square"]["cramers_v"] < 0.05

    assert surge["reference"]["batch_id"] == observed.resample
    assert surge["batch"]["cold_fraction"] == 1.0
    assert surge["chi_square"]["p_value"] < 1e-12 and surge["chi_square"]["cramers_v"] > 0.3
    assert vs_first["reference_source"] == "request"
    assert vs_first["reference"]["batch_id"] == observed.normal
    assert vs_first["chi_square"]["p_value"] < 1e-12
    assert missing.status_code == 404

    # The same figures reach Prometheus, labelled with both batches.
    labels = f'batch_id="{observed.surge}",reference_id="{observed.resample}"'
    (p_value,) = promql(observed.prometheus, f"recfleet_drift_chi2_p_value{{{labels}}}")
    (v,) = promql(observed.prometheus, f"recfleet_drift_cramers_v{{{labels}}}")
    assert float(p_value["value"][1]) == pytest.approx(surge["chi_square"]["p_value"], abs=1e-12)
    assert float(v["value"][1]) == pytest.approx(surge["chi_square"]["cramers_v"], rel=1e-6)


def test_cli_drift_shows_the_test_and_pins_a_reference(observed: Observed) -> None:
    runner = CliRunner()
    url = ["--api-url", observed.gateway]
    shown = runner.invoke(cli, ["drift", observed.surge, "--reference", observed.normal, *url])
    assert shown.exit_code == 0, shown.output
    assert "fraction 1.0000" in shown.output and "chi-square" in shown.output
    assert f"reference    {observed.normal} (request" in shown.output

    pinned = runner.invoke(cli, ["drift", observed.normal, "--pin", *url])
    assert pinned.exit_code == 0, pinned.output
    try:
        as_json = runner.invoke(cli, ["drift", observed.resample, "--json", *url])
        report = json.loads(as_json.stdout)
        assert report["reference_source"] == "pinned"
        assert report["reference"]["batch_id"] == observed.normal
    finally:
        assert runner.invoke(cli, ["drift", "--unpin", *url]).exit_code == 0
    unknown = runner.invoke(cli, ["drift", "no-such-batch", *url])
    assert unknown.exit_code != 0 and "404" in unknown.output


def test_queue_gauges_come_from_the_management_api(observed: Observed) -> None:
    s = observed.settings
    for queue in (s.jobs_queue, s.dead_letter_queue):
        for name in (
            "recfleet_queue_messages",
            "recfleet_queue_messages_unacked",
            "recfleet_queue_consumers",
        ):
            (sample,) = promql(observed.prometheus, f'{name}{{job="gateway",queue="{queue}"}}')
            assert float(sample["value"][1]) >= 0
    # Two worker processes consume the jobs queue.
    consumers = f'recfleet_queue_consumers{{job="gateway",queue="{s.jobs_queue}"}}'
    assert float(promql(observed.prometheus, consumers)[0]["value"][1]) == 2


def test_worker_job_log_lines_carry_batch_and_job_ids(observed: Observed) -> None:
    lines = [
        json.loads(line)
        for line in (observed.log_dir / "worker.log").read_text().splitlines()
        if line.startswith("{")
    ]
    jobs = [r for r in lines if r["msg"].startswith("job done")]
    assert len(jobs) >= 9  # three batches of three jobs
    assert all(r["batch_id"] and r["job_id"].startswith(r["batch_id"]) for r in jobs)
    assert {r["batch_id"] for r in jobs} >= {observed.normal, observed.resample, observed.surge}


# --- Grafana files ---------------------------------------------------------------------


def test_grafana_provisioning_and_dashboards_are_consistent() -> None:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus"
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    assert len(DASHBOARDS) == 3
    uids = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        uids.append(dash["uid"])
        assert isinstance(dash["schemaVersion"], int) and dash["title"]
        panel_ids = [p["id"] for p in dash["panels"]]
        assert len(set(panel_ids)) == len(panel_ids), path.name
        for panel in dash["panels"]:
            where = f"{path.name} / {panel['title']}"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
            assert panel["datasource"]["uid"] == source["uid"], where
            assert panel["targets"], f"{where}: no targets"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(set(refs)) == len(refs), where
            for target in panel["targets"]:
                assert target["expr"].strip(), where
                assert target["datasource"]["uid"] == source["uid"], where
    assert len(set(uids)) == len(uids)
    # The compose stack mounts grafana/dashboards where the provider looks.
    compose = (ROOT / "compose.yml").read_text()
    assert f"./grafana/dashboards:{provider['options']['path']}" in compose
