"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response, Security
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from recfleet.api.auth import Role, require
from recfleet.api.deps import PublisherDep, RedisDep
from recfleet.api.limits import OrjsonRoute
from recfleet.api.metrics import REGISTRY

router = APIRouter(tags=["operations"], route_class=OrjsonRoute)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(publisher: PublisherDep, redis: RedisDep) -> JSONResponse:
    """Ready when the broker channel is open and Redis answers; 503 otherwise."""
    checks = {"broker": publisher.ready, "redis": False}
    try:
        checks["redis"] = bool(await redis.ping())
    except Exception:  # any failure means "not ready", which is what we report
        checks["redis"] = False
    ready = all(checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Security(require(Role.OPERATOR))],
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
)
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
