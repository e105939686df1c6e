"""Versioned SQL migrations for the feedback database, applied by ``recfleet db upgrade``.

Migrations are plain SQL files named ``NNNN_name.sql`` in ``shared/migrations`` (package data),
applied in version order. Each applied version is recorded in ``schema_migrations`` with
the file's checksum. One upgrade runs in a single transaction holding an advisory lock, so
two upgrades started at once apply each migration once, and a failing migration leaves
the database as it was. Nothing here runs at import time.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from recfleet.shared.errors import RecfleetError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any fixed 64-bit key; it only has to be the same for every upgrade of recfleet's schema.
LOCK_KEY = int.from_bytes(b"recfleet", "big")

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RecfleetError):
    """The migration files are inconsistent with each other or with the database."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    name: str
    checksum: str


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in ``directory``, by version.

    Raises MigrationError for a missing directory, a ``.sql`` file with another name
    pattern, or two files of one version.
    """
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {directory} does not exist")
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = FILENAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path.name}: version {version} appears twice")
        found[version] = Migration(version, match.group(2), path.read_text())
    return [found[v] for v in sorted(found)]


def applied(conn: psycopg.Connection) -> list[AppliedMigration]:
    """Migrations recorded in the database (none when the ledger does not exist yet)."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    rows = conn.execute(
        "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
    ).fetchall()
    return [AppliedMigration(int(v), str(n), str(c)) for v, n, c in rows]


def pending(migrations: list[Migration], done: list[AppliedMigration]) -> list[Migration]:
    """The migrations still to apply.

    Raises MigrationError when an applied migration's file changed or disappeared, or when
    a new file has a version below the newest applied one.
    """
    files = {m.version: m for m in migrations}
    for row in done:
        m = files.get(row.version)
        if m is None:
            raise MigrationError(f"version {row.version} ({row.name}) is applied but has no file")
        if m.checksum != row.checksum:
            raise MigrationError(
                f"{m.version:04d}_{m.name}.sql changed after it was applied; "
                "write a new migration instead"
            )
    newest = max((row.version for row in done), default=0)
    todo = [m for m in migrations if m.version not in {row.version for row in done}]
    late = [m for m in todo if m.version < newest]
    if late:
        raise MigrationError(
            f"{late[0].version:04d}_{late[0].name}.sql is older than applied version {newest}"
        )
    return todo


def upgrade(conninfo: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply every pending migration in one transaction; return those applied.

    Raises MigrationError (see ``pending``) or psycopg.Error when the database cannot be
    reached or a migration fails; either way nothing is applied.
    """
    migrations = discover(directory)
    with psycopg.connect(conninfo, connect_timeout=10) as conn, conn.transaction():
        # Held until commit: a concurrent upgrade waits, then finds nothing to do.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(CREATE_LEDGER)
        todo = pending(migrations, applied(conn))
        for m in todo:
            conn.execute(m.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (m.version, m.name, m.checksum),
            )
    return todo


def status(
    conninfo: str, directory: Path = MIGRATIONS_DIR
) -> tuple[list[Migration], list[Migration]]:
    """(applied, pending) migrations of the database at ``conninfo``.

    Raises MigrationError or psycopg.Error as ``upgrade`` does.
    """
    migrations = discover(directory)
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        done = applied(conn)
        todo = pending(migrations, done)
    versions = {row.version for row in done}
    return [m for m in migrations if m.version in versions], todo
