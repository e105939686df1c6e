"""The direction of imports: api -> shared <- worker; only worker and offline load torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


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


def test_the_wheel_installs_everything_under_one_namespace(tmp_path: Path) -> None:
    """Installed next to another project with an ``api`` or ``shared`` package, neither
    breaks: the wheel holds nothing outside ``recfleet/`` but its metadata."""
    # Built from a copy, so the build leaves nothing in the checkout.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("recfleet", "api", "worker", "shared", "offline", "cli"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=IGNORED)
    subprocess.run(
        [*PIP_WHEEL, "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("recfleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"recfleet", next(t for t in tops if t.endswith(".dist-info"))}
    for package in ("api", "worker", "shared", "offline", "cli"):
        assert f"recfleet/{package}/__init__.py" in names
    assert "recfleet/api/templates/page.html" in names
    assert any(n.startswith("recfleet/shared/migrations/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "recfleet = recfleet.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
