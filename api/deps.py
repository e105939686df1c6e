"""Clients owned by the lifespan, handed to routes through ``Annotated`` dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from recfleet.api.broker import Publisher
from recfleet.api.db import Database
from recfleet.api.results import ResultReader
from recfleet.api.sync import SyncRequester
from recfleet.shared.keys import Keys
from recfleet.shared.settings import Settings


@dataclass
class Clients:
    settings: Settings
    publisher: Publisher
    redis: Redis
    keys: Keys
    results: ResultReader
    sync: SyncRequester
    db: Database | None = None  # the feedback database (PostgreSQL pool)


def get_clients(request: Request) -> Clients:
    clients: Clients = request.app.state.clients
    return clients


ClientsDep = Annotated[Clients, Depends(get_clients)]
