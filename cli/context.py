"""How settings reach commands: read once per invocation, kept in the click context."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import click

from recfleet.shared.settings import Settings, get_settings

P = ParamSpec("P")
R = TypeVar("R")

api_url_option = click.option("--api-url", default=None, help="gateway URL (default from settings)")


def settings_from(ctx: click.Context) -> Settings:
    """The settings of this invocation: the root context's ``obj`` if a caller gave one
    (``cli.main(obj=settings)``, a test's ``CliRunner.invoke(..., obj=settings)``), else read
    from the environment once and kept there.

    Raises click.ClickException naming the problem if the environment does not validate.
    """
    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        try:
            root.obj = get_settings()
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise click.ClickException(f"bad configuration: {exc}") from exc
    return root.obj


def pass_settings(command: Callable[Concatenate[Settings, P], R]) -> Callable[P, R]:
    """Decorate a command callback to receive the settings as its first argument."""

    @functools.wraps(command)
    def with_settings(*args: P.args, **kwargs: P.kwargs) -> R:
        return command(settings_from(click.get_current_context()), *args, **kwargs)

    return with_settings
