"""The resources the lifespan opens, one ``Annotated`` dependency each.

``api/app.py``'s lifespan puts each on ``app.state`` under the name below; a route
asks only for what it uses, so its signature says which services it touches.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from recfleet.api.broker import Publisher
from recfleet.api.db import Database, DatabaseUnavailable
from recfleet.api.results import ResultReader
from recfleet.api.sync import SyncRequester
from recfleet.shared.keys import Keys
from recfleet.shared.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


def get_keys(request: Request) -> Keys:
    keys: Keys = request.app.state.keys
    return keys


def get_publisher(request: Request) -> Publisher:
    publisher: Publisher = request.app.state.publisher
    return publisher


async def get_results(request: Request) -> ResultReader:
    # async: FastAPI calls a plain-def dependency through the thread pool, a hop that
    # costs more than the whole Redis read on GET /api/playlist/{user_id}.
    results: ResultReader = request.app.state.results
    return results


def get_sync(request: Request) -> SyncRequester:
    sync: SyncRequester = request.app.state.sync
    return sync


def get_database(request: Request) -> Database:
    """The feedback database. Raises DatabaseUnavailable when none is configured."""
    db: Database | None = getattr(request.app.state, "db", None)
    if db is None:
        raise DatabaseUnavailable("no feedback database is configured")
    return db


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
KeysDep = Annotated[Keys, Depends(get_keys)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]
ResultsDep = Annotated[ResultReader, Depends(get_results)]
SyncDep = Annotated[SyncRequester, Depends(get_sync)]
DatabaseDep = Annotated[Database, Depends(get_database)]
