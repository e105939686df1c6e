"""The command line's assembly: every group registered, settings through the click context."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from recfleet.cli.main import cli
from recfleet.shared.settings import Settings, get_settings

COMMANDS = {
    "api",
    "artifacts",
    "bench",
    "db",
    "demo",
    "dlq",
    "drift",
    "keys",
    "feedback",
    "generations",
    "schedule",
    "status",
    "submit",
    "worker",
}


def test_every_command_group_is_registered() -> None:
    assert set(cli.commands) == COMMANDS


def test_api_url_is_built_from_host_and_port() -> None:
    assert Settings(api_host="10.0.0.7", api_port=8123).api_url == "http://10.0.0.7:8123"


def test_a_command_uses_the_settings_given_in_the_context(tmp_path: Path) -> None:
    # No artifacts where these settings point: the error names that directory, so the
    # command saw these settings and not the environment's.
    settings = Settings(environment="test", artifacts=tmp_path / "nowhere")
    result = CliRunner().invoke(cli, ["submit", "--all"], obj=settings)
    assert result.exit_code == 1
    assert "nowhere" in result.output


def test_bad_configuration_is_a_message_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECFLEET_API_PORT", "not-a-port")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["status", "some-batch"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "bad configuration" in result.output
    assert "Traceback" not in result.output
