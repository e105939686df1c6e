"""``recfleet bench reads``: GET /api/playlist/{user_id} latency and rate on one gateway process,
under load from wrk running as a second process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click
import httpx
import numpy as np

from recfleet.cli.bench_bare import GENERATION
from recfleet.cli.fleet import LocalFleet, settings_env
from recfleet.cli.measure import cleanup
from recfleet.shared.codec import encode_results, model_tag
from recfleet.shared.keys import Keys, bucket_mappings
from recfleet.shared.messages import new_id
from recfleet.shared.redis import redis_client
from recfleet.shared.settings import Settings, get_settings

WRK_SCRIPT = """
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "%s" .. math.random(0, %d))
end
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"unexpected latency {text!r} in wrk's output")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    """Requests/s and latency percentiles (ms) from ``wrk --latency`` output."""
    figures: dict[str, float] = {}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rate is None:
        raise ValueError("wrk printed no Requests/sec line")
    figures["requests_per_s"] = float(rate.group(1))
    total = re.search(r"(\d+) requests in", output)
    if total is not None:
        figures["requests"] = float(total.group(1))
    for pct in ("50", "75", "90", "99"):
        line = re.search(rf"^\s+{pct}%\s+(\S+)", output, re.MULTILINE)
        if line:
            figures[f"p{pct}_ms"] = _ms(line.group(1))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    figures["non_2xx"] = float(errors.group(1)) if errors else 0.0
    return figures


def populate(settings: Settings, users: int, generations: int) -> None:
    """Write ``generations`` generations of synthetic results for users 0..users-1 and
    make them active, the newest (the one the bare route reads) current."""
    client = redis_client(settings)
    keys = Keys(settings.redis_prefix)
    rng = np.random.default_rng(0)
    tag = model_tag("bench-model")
    names = [f"{GENERATION}{i}" for i in range(generations - 1, 0, -1)] + [GENERATION]
    for age, name in enumerate(names):
        for start in range(0, users, 10_000):
            ids = list(range(start, min(start + 10_000, users)))
            values = encode_results(
                rng.integers(0, 100_000, size=(len(ids), 10)),
                np.zeros(len(ids), bool),
                int(time.time()),
                tag,
            )
            with client.pipeline(transaction=False) as pipe:
                for key, mapping in bucket_mappings(keys, name, ids, values).items():
                    pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
                pipe.execute()
        client.zadd(keys.history, {name: time.time() + age})
    client.hset(keys.models, str(tag), "bench-model")
    client.close()


def run_wrk(wrk: str, url: str, script: Path, threads: int, connections: int, duration: int) -> str:
    """wrk's output for one load run. Raises subprocess.CalledProcessError."""
    return subprocess.run(
        [
            wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def bare_server(settings: Settings, port: int, log_dir: Path) -> Iterator[tuple[str, int]]:
    """The bare route's server (uvicorn, as ``recfleet api`` runs it). Yields its URL
    and pid."""
    url = f"http://127.0.0.1:{port}"
    with (log_dir / "bare.log").open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "recfleet.cli.bench_bare:create_bare_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise click.ClickException(f"the bare route's server did not start; see {log_dir}")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}


@click.command("reads")
@click.option("--users", type=click.IntRange(1), default=100_000, show_default=True)
@click.option(
    "--duration", type=click.IntRange(1, 300), default=10, show_default=True, help="seconds of load"
)
@click.option("--connections", type=click.IntRange(1, 1000), default=32, show_default=True)
@click.option(
    "--threads", type=click.IntRange(1, 16), default=1, show_default=True, help="wrk threads"
)
@click.option(
    "--generations",
    type=click.IntRange(1, 16),
    default=2,
    show_default=True,
    help="active generations a read falls through (prune --keep N leaves N)",
)
@click.option(
    "--compare",
    is_flag=True,
    help="also load a bare FastAPI route doing one HGET (the same wrk load, in turn)",
)
@click.option(
    "--rounds", type=click.IntRange(1, 20), default=1, show_default=True, help="load runs per route"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on the last line")
def bench_reads(
    users: int,
    duration: int,
    connections: int,
    threads: int,
    generations: int,
    compare: bool,
    rounds: int,
    as_json: bool,
) -> None:
    """Start one gateway process on private keys, fill active generations, and load
    GET /api/playlist/{random user} with wrk; print requests/s and latency percentiles
    (medians over the rounds). With --compare, the bare route is loaded in turn."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise click.ClickException("wrk is not installed (Debian: apt-get install wrk)")
    base = get_settings()
    run_id = new_id()[:8]
    s = base.isolated(f"bench-{run_id}", api_port=base.api_port + 19, log_level="WARNING")
    runs: dict[str, list[dict[str, float]]] = {"gateway": [], "bare": []}
    try:
        populate(s, users, generations)
        with tempfile.TemporaryDirectory(prefix="recfleet-bench-") as tmp:
            scripts = {}
            for name, path in (("gateway", "/api/playlist/"), ("bare", "/bare/")):
                scripts[name] = Path(tmp) / f"{name}.lua"
                scripts[name].write_text(WRK_SCRIPT % (path, users - 1))
            with LocalFleet(s, 0, Path(tmp)) as fleet, ExitStack() as stack:
                assert fleet.api is not None
                servers = {"gateway": (fleet.base_url, fleet.api.pid)}
                if compare:
                    servers["bare"] = stack.enter_context(bare_server(s, s.api_port + 1, Path(tmp)))
                for _ in range(rounds):
                    for name, (url, pid) in servers.items():
                        cpu = cpu_seconds(pid)
                        out = run_wrk(wrk, url, scripts[name], threads, connections, duration)
                        cpu = cpu_seconds(pid) - cpu
                        click.echo(f"-- {name}\n{out}")
                        measured = parse_wrk(out)
                        # CPU per request of the server process: what a saturated process
                        # can serve, and far less sensitive to other load than a rate.
                        measured["cpu_us_per_request"] = cpu / measured["requests"] * 1e6
                        runs[name].append(measured)
    finally:
        cleanup(s)
    figures = {name: _median(r) for name, r in runs.items() if r}
    if compare:
        g, b = figures["gateway"], figures["bare"]
        # Each round loads the two routes back to back: the per-round ratio cancels most
        # of a shared machine's drift, so its median is the figure to quote.
        pairs = list(zip(runs["gateway"], runs["bare"], strict=True))
        figures["gateway_vs_bare"] = {
            "requests_per_s": g["requests_per_s"] / b["requests_per_s"],
            "p99": g["p99_ms"] / b["p99_ms"],
            "median_round_requests_per_s": float(
                np.median([x["requests_per_s"] / y["requests_per_s"] for x, y in pairs])
            ),
            "median_round_p99": float(np.median([x["p99_ms"] / y["p99_ms"] for x, y in pairs])),
            "median_round_cpu_per_request": float(
                np.median([x["cpu_us_per_request"] / y["cpu_us_per_request"] for x, y in pairs])
            ),
        }
    for name, fig in figures.items():
        click.echo(f"{name}: " + "  ".join(f"{k} {v:,.3f}" for k, v in fig.items()))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "benchmark": "reads",
                    "users": users,
                    "generations": generations,
                    "connections": connections,
                    "duration_s": duration,
                    "rounds": rounds,
                    **figures,
                }
            )
        )
