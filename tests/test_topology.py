"""The one topology spec: names per shard, quorum replicas, and the settings it reads."""

from __future__ import annotations

import pytest

from recfleet.shared.settings import Settings
from recfleet.shared.topology import jobs_queue, queue_names, sync_queue, topology


def test_an_unsharded_model_keeps_the_plain_queue_names() -> None:
    s = Settings(environment="test")
    assert queue_names(s) == (
        "recfleet.jobs.dlq",
        "recfleet.jobs.dead-events",
        "recfleet.jobs",
        "recfleet.sync",
    )
    assert jobs_queue(s) == "recfleet.jobs" and sync_queue(s) == "recfleet.sync"


def test_each_shard_gets_its_own_jobs_and_sync_queue() -> None:
    s = Settings(environment="test")
    names = topology(s, shards=2).queue_names
    assert {"recfleet.jobs.shard-0", "recfleet.jobs.shard-1"} <= set(names)
    assert {"recfleet.sync.shard-0", "recfleet.sync.shard-1"} <= set(names)
    assert "recfleet.jobs" not in names
    one = topology(s, shards=2, only_shard=1).queue_names
    assert "recfleet.jobs.shard-1" in one and "recfleet.jobs.shard-0" not in one
    assert "recfleet.jobs.dlq" in one  # the dead-letter side is shared by every shard


def test_quorum_replicas_reach_every_queue_on_a_cluster() -> None:
    single = {q.name: q.arguments for q in topology(Settings(environment="test")).queues}
    assert "x-quorum-initial-group-size" not in single["recfleet.jobs"]
    assert "x-queue-type" not in single["recfleet.sync"]  # classic on one node
    cluster = Settings(environment="test", quorum_replicas=3)
    for q in topology(cluster, shards=2).queues:
        assert q.arguments["x-queue-type"] == "quorum", q.name
        assert q.arguments["x-quorum-initial-group-size"] == 3, q.name


def test_amqp_url_takes_a_list_of_cluster_nodes() -> None:
    s = Settings(amqp_url="amqp://a:b@n1:5672/, amqp://a:b@n2:5672/")
    assert s.amqp_urls == ["amqp://a:b@n1:5672/", "amqp://a:b@n2:5672/"]
    with pytest.raises(ValueError, match="names no broker"):
        Settings(amqp_url=" , ")
    with pytest.raises(ValueError):
        Settings(amqp_url="amqp://a:b@n1:5672/,http://n2/")
    with pytest.raises(ValueError, match="guest"):
        Settings(
            environment="production",
            amqp_url="amqp://u:p@n1:5672/,amqp://guest:guest@n2:5672/",
            redis_url="redis://:x@r:6379/0",
            database_url="postgresql://u:p@d:5432/db",
        )
