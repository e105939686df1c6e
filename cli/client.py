"""An HTTP client of the gateway for ``submit`` and ``status``, with a rich progress bar."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class GatewayError(Exception):
    """The gateway refused a request or could not be reached."""


@dataclass
class Submitted:
    batch_ids: list[str]
    users: int
    jobs: int
    seconds: float


def chunks(ids: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def submit(client: httpx.Client, user_ids: Sequence[int], chunk: int) -> Submitted:
    """Post ``user_ids`` in requests of ``chunk`` ids; one batch per request.

    Raises GatewayError naming the status and the gateway's reason.
    """
    start = time.perf_counter()
    batch_ids, users, jobs = [], 0, 0
    for part in chunks(user_ids, chunk):
        try:
            resp = client.post("/api/playlist/beta_recommend/", json={"user_ids": list(part)})
        except httpx.HTTPError as exc:
            raise GatewayError(f"gateway unreachable at {client.base_url}: {exc}") from exc
        if resp.status_code != 202:
            raise GatewayError(f"gateway answered {resp.status_code}: {resp.text[:500]}")
        body = resp.json()
        batch_ids.append(body["batch_id"])
        users += body["users"]
        jobs += body["jobs"]
    return Submitted(batch_ids, users, jobs, time.perf_counter() - start)


def batch_status(client: httpx.Client, batch_id: str) -> dict:
    """The gateway's progress document. Raises GatewayError."""
    try:
        resp = client.get(f"/api/batches/{batch_id}")
    except httpx.HTTPError as exc:
        raise GatewayError(f"gateway unreachable at {client.base_url}: {exc}") from exc
    if resp.status_code != 200:
        raise GatewayError(f"gateway answered {resp.status_code}: {resp.text[:500]}")
    return dict(resp.json())


def wait(
    client: httpx.Client, batch_ids: list[str], users: int, *, show: bool = True
) -> list[dict]:
    """Poll until every batch is done or failed, with a progress bar (rate and ETA)."""
    columns = (
        TextColumn("[bold]ranking"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("users"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not show, transient=False) as progress:
        task = progress.add_task("ranking", total=users, rate="")
        start = time.perf_counter()
        while True:
            statuses = [batch_status(client, b) for b in batch_ids]
            done = sum(s["users_done"] + s["users_dead"] for s in statuses)
            rate = done / max(time.perf_counter() - start, 1e-9)
            progress.update(task, completed=done, rate=f"{rate:,.0f}/s")
            if all(s["state"] in ("done", "failed") for s in statuses):
                return statuses
            time.sleep(0.1)
