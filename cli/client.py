"""An HTTP client of the gateway for ``submit`` and ``status``, with a rich progress bar."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import httpx
import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from recfleet.shared.settings import Settings

console = Console(stderr=True)
# How long a request keyed by Idempotency-Key is retried while the gateway says an earlier
# attempt with the same key is "still running": longer than the gateway's lease on the key
# (a few publish timeouts), so a retry after a gateway crash gets through.
STILL_RUNNING_RETRY_S = 120.0


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


def auth_headers(settings: Settings) -> dict[str, str]:
    """The bearer key of ``RECFLEET_API_KEY``, if one is set."""
    key = settings.api_key
    return {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}


def _still_running(resp: httpx.Response) -> bool:
    return resp.status_code == 409 and "still running" in resp.text


def _post(
    client: httpx.Client,
    path: str,
    expect: int,
    *,
    still_running_for_s: float = STILL_RUNNING_RETRY_S,
    **kwargs: object,
) -> dict:
    """POST, retrying 429/503 (as Retry-After says) and network errors a few times, and a
    ``409 ... still running`` (an earlier attempt holds the Idempotency-Key) with back-off
    for up to ``still_running_for_s``.

    Raises GatewayError naming the status and the gateway's reason.
    """
    attempt, backoff = 0, 0.5
    give_up_at = time.monotonic() + still_running_for_s
    while True:
        attempt += 1
        try:
            resp = client.post(path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            if attempt >= 5:
                raise GatewayError(f"gateway unreachable at {client.base_url}: {exc}") from exc
            time.sleep(attempt)
            continue
        if resp.status_code == expect:
            return dict(resp.json())
        if resp.status_code in (429, 503) and attempt < 5:
            time.sleep(float(resp.headers.get("Retry-After", attempt)))
            continue
        if _still_running(resp) and time.monotonic() + backoff < give_up_at:
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            continue
        raise GatewayError(f"gateway answered {resp.status_code}: {resp.text[:500]}")


def submit(
    client: httpx.Client, user_ids: Sequence[int], chunk: int, *, run: bool = False
) -> Submitted:
    """Submit ``user_ids`` as ONE batch: open it, append requests of ``chunk`` ids, seal
    it. With ``run`` it is a declared run (a new generation, made current when complete);
    without, ad-hoc (results go into the current generation as they finish). Each request
    carries an Idempotency-Key derived from the batch and chunk, so a retry after a lost
    answer never queues the same users twice.

    Raises GatewayError naming the status and the gateway's reason.
    """
    start = time.perf_counter()
    batch_id = _post(
        client,
        "/api/batches",
        201,
        content=orjson.dumps({"run": run}),
        headers={"content-type": "application/json"},
    )["batch_id"]
    users = jobs = 0
    for i, part in enumerate(chunks(user_ids, chunk)):
        body = _post(
            client,
            "/api/playlist/beta_recommend/",
            202,
            content=orjson.dumps({"user_ids": list(part), "batch_id": batch_id}),
            headers={"content-type": "application/json", "Idempotency-Key": f"{batch_id}-{i}"},
        )
        users += body["users"]
        jobs += body["jobs"]
    _post(client, f"/api/batches/{batch_id}/seal", 200)
    return Submitted([batch_id], users, jobs, time.perf_counter() - start)


def batch_status(client: httpx.Client, batch_id: str, *, failed_users: bool = False) -> dict:
    """The gateway's progress document. Raises GatewayError."""
    try:
        params = {"failed_users": "true"} if failed_users else None
        resp = client.get(f"/api/batches/{batch_id}", params=params)
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
