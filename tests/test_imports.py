"""The direction of imports: api -> shared <- worker; only worker and offline load torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after_import(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(out.split())


def test_importing_every_api_module_never_loads_torch() -> None:
    code = (
        "import importlib, pkgutil, recfleet.api as api\n"
        "for m in pkgutil.walk_packages(api.__path__, 'recfleet.api.'):\n"
        "    importlib.import_module(m.name)\n"
        "from recfleet.api.app import create_app\n"
        "create_app()"
    )
    loaded = _modules_after_import(code)
    assert "recfleet.api.app" in loaded
    assert "torch" not in loaded
    assert not any(m.startswith(("recfleet.worker", "recfleet.offline")) for m in loaded)


@pytest.mark.parametrize("package", ["shared"])
def test_shared_imports_neither_side(package: str) -> None:
    code = (
        f"import importlib, pkgutil, recfleet.{package} as pkg\n"
        f"for m in pkgutil.walk_packages(pkg.__path__, 'recfleet.{package}.'):\n"
        "    importlib.import_module(m.name)"
    )
    loaded = _modules_after_import(code)
    assert "torch" not in loaded
    assert not any(
        m.startswith(f"recfleet.{side}")
        for side in ("api", "worker", "offline", "cli")
        for m in loaded
    )


def test_worker_loads_its_compute_libraries_only_when_used() -> None:
    loaded = _modules_after_import("import recfleet.worker.handler")
    assert "numba" in loaded  # the ranking loop is compiled with numba
    assert "torch" in _modules_after_import("import recfleet.worker.main")
