"""``recfleet bench reads``: GET /api/playlist/{user_id} latency and rate on one gateway process,
under load from wrk running as a second process."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import redis

from recfleet.cli.fleet import LocalFleet
from recfleet.cli.measure import cleanup
from recfleet.shared.codec import encode_results, model_tag
from recfleet.shared.keys import Keys, bucket_mappings
from recfleet.shared.messages import new_id
from recfleet.shared.settings import Settings, get_settings

WRK_SCRIPT = """
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/api/playlist/" .. math.random(0, %d))
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
    for pct in ("50", "75", "90", "99"):
        line = re.search(rf"^\s+{pct}%\s+(\S+)", output, re.MULTILINE)
        if line:
            figures[f"p{pct}_ms"] = _ms(line.group(1))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    figures["non_2xx"] = float(errors.group(1)) if errors else 0.0
    return figures


def populate(settings: Settings, users: int) -> None:
    """Write one generation of synthetic results for users 0..users-1 and make it current."""
    client = redis.Redis.from_url(str(settings.redis_url))
    gen_keys = Keys(settings.redis_prefix)
    rng = np.random.default_rng(0)
    tag = model_tag("bench-model")
    for start in range(0, users, 10_000):
        ids = list(range(start, min(start + 10_000, users)))
        values = encode_results(
            rng.integers(0, 100_000, size=(len(ids), 10)),
            np.zeros(len(ids), bool),
            int(time.time()),
            tag,
        )
        with client.pipeline(transaction=False) as pipe:
            for key, mapping in bucket_mappings(gen_keys, "bench", ids, values).items():
                pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            pipe.execute()
    client.hset(Keys(settings.redis_prefix).models, str(tag), "bench-model")
    client.zadd(gen_keys.history, {"bench": time.time()})
    client.close()


@click.command("reads")
@click.option("--users", type=click.IntRange(1), default=100_000, show_default=True)
@click.option(
    "--duration", type=click.IntRange(1, 300), default=10, show_default=True, help="seconds of load"
)
@click.option("--connections", type=click.IntRange(1, 1000), default=32, show_default=True)
@click.option(
    "--threads", type=click.IntRange(1, 16), default=1, show_default=True, help="wrk threads"
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on the last line")
def bench_reads(users: int, duration: int, connections: int, threads: int, as_json: bool) -> None:
    """Start one gateway process on private keys, fill a generation, and load
    GET /api/playlist/{random user} with wrk; print requests/s and latency percentiles."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise click.ClickException("wrk is not installed (Debian: apt-get install wrk)")
    base = get_settings()
    run_id = new_id()[:8]
    s = base.isolated(f"bench-{run_id}", api_port=base.api_port + 19, log_level="WARNING")
    try:
        populate(s, users)
        with tempfile.TemporaryDirectory(prefix="recfleet-bench-") as tmp:
            script = Path(tmp) / "paths.lua"
            script.write_text(WRK_SCRIPT % (users - 1))
            with LocalFleet(s, 0, Path(tmp)) as fleet:
                out = subprocess.run(
                    [
                        wrk,
                        f"-t{threads}",
                        f"-c{connections}",
                        f"-d{duration}s",
                        "--latency",
                        "-s",
                        str(script),
                        fleet.base_url,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
    finally:
        cleanup(s)
    figures = parse_wrk(out)
    click.echo(out)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "benchmark": "reads",
                    "users": users,
                    "connections": connections,
                    "duration_s": duration,
                    "users_per_s": figures["requests_per_s"],
                    **figures,
                }
            )
        )
