"""Figures lines: one per fault test, repeated in the terminal summary of the session."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.support.invariants import Tally

# Figures lines of this session, repeated in the terminal summary.
FIGURES: list[str] = []


def report(name: str, **figures: object) -> str:
    """Print one figures line (``name: users N accepted N results N lost 0 ...``)."""
    line = f"{name}: " + " ".join(
        f"{key.replace('_', '-')} {value}" for key, value in figures.items()
    )
    print(line)
    FIGURES.append(line)
    return line


def report_tally(name: str, tally: Tally, *, submitted: int | None = None, **extra: object) -> str:
    """The figures line of a checked run: users submitted (default: the accepted ones),
    accepted, results, lost and dlq from ``tally``, then the test's own figures."""
    return report(
        name,
        users=tally.users if submitted is None else submitted,
        accepted=tally.users,
        results=tally.results,
        lost=tally.lost,
        dlq=tally.dlq,
        **extra,
    )
