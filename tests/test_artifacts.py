"""Loading refuses artifact directories a user brought with broken CSR arrays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from recfleet.shared.artifacts import load_artifacts, write_manifest
from recfleet.shared.errors import ArtifactError


@pytest.mark.parametrize(
    "indptr_change",
    [lambda p: p.__setitem__(0, 1), lambda p: p.__setitem__(slice(5, 6), p[4] - 1)],
    ids=["not-starting-at-zero", "decreasing"],
)
def test_broken_candidate_pointers_are_refused(
    small_artifacts: Path, tmp_path: Path, indptr_change: object
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(small_artifacts, broken)
    indptr = np.load(broken / "candidates_indptr.npy").copy()
    indptr_change(indptr)  # type: ignore[operator]
    np.save(broken / "candidates_indptr.npy", indptr)
    manifest = json.loads((broken / "manifest.json").read_text())
    write_manifest(broken, manifest)  # checksums match: only the shape check can object
    with pytest.raises(ArtifactError, match="candidates_indptr must start at 0"):
        load_artifacts(broken)
