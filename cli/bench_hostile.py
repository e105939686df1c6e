"""``recfleet bench hostile``: what each class of hostile request costs the gateway.

Starts a gateway process with keys switched on (private queue names and Redis prefix),
sends each request ``--repeats`` times and reports the answer's status and size, and the
gateway's CPU time per request, read from ``/proc/<pid>/stat`` before and after (Linux).
The baseline rows (a health probe, a valid batch of 1000 ids) are measured in the same
run.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
import httpx
from rich.table import Table

from recfleet.api.auth import Role, entry, new_key
from recfleet.cli.client import console
from recfleet.cli.context import settings_from
from recfleet.cli.fleet import LocalFleet
from recfleet.cli.measure import cleanup
from recfleet.shared.messages import new_id
from recfleet.shared.settings import Settings

Request = Callable[[httpx.Client], httpx.Response]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cases(key: str, read_key: str) -> dict[str, Request]:
    auth = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    submit = "/api/playlist/beta_recommend/"

    def post(body: bytes, headers: dict[str, str] | None = None) -> Request:
        return lambda c: c.post(submit, content=body, headers={**auth, **(headers or {})})

    return {
        "baseline: GET /healthz": lambda c: c.get("/healthz"),
        "baseline: valid batch, 1000 ids": post(
            json.dumps({"user_ids": list(range(1000))}).encode()
        ),
        "no key": lambda c: c.post(submit, content=b'{"user_ids":[1]}'),
        "wrong role": post(b'{"user_ids":[1]}', {"Authorization": f"Bearer {read_key}"}),
        "1.2 MB of bad ids": post(b'{"user_ids": [' + b'"x",' * 300_000 + b'"x"]}'),
        "4 MB of ids, last one bad": post(b'{"user_ids": [' + b"1," * 2_000_000 + b'"x"]}'),
        "4 MB of good ids (over the 100 000 per request)": post(
            b'{"user_ids": [' + b"7," * 2_000_000 + b"1]}"
        ),
        "3.8 MB of unknown fields": post(
            b'{"user_ids": [1]' + b"".join(b',"k%d": 1' % i for i in range(290_000)) + b"}"
        ),
        "1e400": post(b'{"user_ids": [1e400]}'),
        "NaN": post(b'{"user_ids": [NaN]}'),
        "integer of 5000 digits": post(b'{"user_ids": [1' + b"0" * 5000 + b"]}"),
        "nesting 100 000 deep": post(b'{"user_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "path id 5.0": lambda c: c.get(
            "/api/playlist/5.0", headers={"Authorization": f"Bearer {read_key}"}
        ),
        "Idempotency-Key of 10 kB": post(b'{"user_ids":[1]}', {"Idempotency-Key": "k" * 10_000}),
        "header of 1 MB": post(b'{"user_ids":[1]}', {"X-Junk": "k" * 1_000_000}),
        "body over the limit (declared)": lambda c: c.post(
            submit, content=b"1" * (5 * 1024 * 1024), headers=auth
        ),
    }


def _measure(pid: int, client: httpx.Client, request: Request, repeats: int) -> dict:
    statuses, sizes = set(), []
    before = _cpu_s(pid)
    start = time.perf_counter()
    for _ in range(repeats):
        try:
            resp = request(client)
            statuses.add(resp.status_code)
            sizes.append(len(resp.content))
        except httpx.HTTPError as exc:  # the gateway may close the connection on purpose
            statuses.add(type(exc).__name__)  # type: ignore[arg-type]
            sizes.append(0)
    wall = time.perf_counter() - start
    return {
        "status": ",".join(map(str, sorted(statuses, key=str))),
        "bytes": max(sizes),
        "cpu_ms": (_cpu_s(pid) - before) / repeats * 1000,
        "wall_ms": wall / repeats * 1000,
    }


@click.command("hostile")
@click.option("--repeats", type=click.IntRange(1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def bench_hostile(repeats: int, as_json: bool) -> None:
    """Status, answer size and gateway CPU of each class of hostile request."""
    submit_key, read_key = new_key(), new_key()
    keys = f"{entry('bench', submit_key, [Role.SUBMIT])},{entry('reader', read_key, [Role.READ])}"
    settings: Settings = settings_from(click.get_current_context()).isolated(
        f"rfbench-{new_id()[:10]}",
        api_port=_free_port(),
        api_keys=keys,
        page_secret=new_key(),
    )
    rows = {}
    try:
        with tempfile.TemporaryDirectory() as logs:
            fleet = LocalFleet(settings, processes=0, log_dir=Path(logs))
            with fleet:
                assert fleet.api is not None
                with httpx.Client(base_url=fleet.base_url, timeout=60) as client:
                    for name, request in _cases(submit_key, read_key).items():
                        rows[name] = _measure(fleet.api.pid, client, request, repeats)
    finally:
        cleanup(settings)
    if as_json:
        click.echo(json.dumps({"repeats": repeats, "rows": rows}, indent=2))
        return
    table = Table(title=f"hostile requests, {repeats} each (CPU: the gateway process)")
    for column in ("request", "status", "answer bytes", "CPU ms/request", "wall ms/request"):
        table.add_column(column, justify="left" if column == "request" else "right")
    for name, r in rows.items():
        table.add_row(
            name, r["status"], str(r["bytes"]), f"{r['cpu_ms']:.1f}", f"{r['wall_ms']:.1f}"
        )
    console.print(table)
