"""Redis clients: one Redis, or a Redis Cluster with ``RECFLEET_REDIS_CLUSTER=true``.

With a cluster, ``RECFLEET_REDIS_URL`` names any one node; redis-py's cluster client
discovers the others, routes each command to the node owning its key's slot, and
follows MOVED/ASK redirections and failovers. recfleet keeps every multi-key command
and script inside one slot (the ``{batch_id}`` hash tag of a batch's keys).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.commands.core import Script

from recfleet.shared.settings import Settings


class _ClusterScript(Script):
    """A script that also runs inside a cluster pipeline.

    redis-py's cluster pipelines refuse EVALSHA (a node may not have the script
    cached), so within one the script's text is sent with EVAL; elsewhere it runs as
    usual (EVALSHA, loading it on NOSCRIPT).
    """

    def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        if isinstance(client, redis.cluster.ClusterPipeline):
            keys, args = list(keys or []), list(args or [])
            return client.execute_command("EVAL", self.script, len(keys), *keys, *args)
        return super().__call__(keys, args, client)


class _Cluster(redis.cluster.RedisCluster):
    def register_script(self, script: Any) -> Script:
        return _ClusterScript(self, script)


def redis_client(settings: Settings, **options: Any) -> redis.Redis:
    """A synchronous client for the configured Redis or Redis Cluster.

    Typed as ``redis.Redis``: the cluster client offers the same commands, pipelines
    and scripts recfleet uses.
    """
    url = str(settings.redis_url)
    if settings.redis_cluster:
        return _Cluster.from_url(url, **options)  # type: ignore[return-value]
    return redis.Redis.from_url(url, **options)


def async_redis_client(settings: Settings, **options: Any) -> redis.asyncio.Redis:
    """An asyncio client for the configured Redis or Redis Cluster (see ``redis_client``)."""
    url = str(settings.redis_url)
    if settings.redis_cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(url, **options)  # type: ignore[return-value]
    return redis.asyncio.Redis.from_url(url, **options)
