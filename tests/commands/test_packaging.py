"""The checkout never shadows an installed package: run from the repository root, imports find PyPI's."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _origin_from_root(module: str) -> Path:
    """Where ``import module`` finds it in a fresh interpreter started in the repository root."""
    out = subprocess.run(
        [sys.executable, "-c", f"import {module}; print({module}.__file__)"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip()).resolve()


def test_import_kernels_from_the_repo_root_finds_pypis_package():
    # transformers imports PyPI's `kernels` (transformers.integrations.hub_kernels); the top-level
    # kernels/ folder of this repository must never stand in for it.
    installed = Path(distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    origin = _origin_from_root("kernels")
    assert origin == installed
    assert REPO_ROOT / "kernels" not in origin.parents


def test_the_triton_kernels_import_under_their_own_name():
    origin = _origin_from_root("rmserve_kernels.heads")
    assert origin == REPO_ROOT / "kernels" / "rmserve_kernels" / "heads.py"
    assert not (REPO_ROOT / "kernels" / "__init__.py").exists()
