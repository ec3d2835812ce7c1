"""The Docker images' files: hadolint finds nothing, and every ignored rule is explained."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (pip install -e '.[dev]').")
    run = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_ignored_rule_is_explained_and_the_image_is_safe(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            rule = line.split("=", 1)[1]
            assert rule in lines[number - 1], (
                f"{dockerfile.name}:{number + 1}: explain {rule} on the line above"
            )
    text = dockerfile.read_text()
    assert "USER 1000:1000" in text  # non-root
    assert 'ENTRYPOINT ["rmserve", "serve"]' in text
    assert "HEALTHCHECK" in text and "/health" in text


def test_compose_reserves_a_gpu_mounts_models_read_only_and_restarts():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    service = compose["services"]["rmserve"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert any(v.endswith(":/models:ro") for v in service["volumes"])
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert service["restart"] == "unless-stopped"
    assert service["environment"]["RMSERVE_CONFIG"] == "/config/models.yaml"
    models = yaml.safe_load((ROOT / "docker" / "models.yaml").read_text())
    from rmserve.config import ModelSpec

    assert [ModelSpec(**m).name for m in models["models"]] == ["demo"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_installs_from_the_lock(dockerfile):
    # every pip install is hash-checked from requirements/, but for torch (an exact pin, from PyTorch's
    # index for the image's build) and the project itself (--no-deps, built with the lock's setuptools)
    text = dockerfile.read_text()
    assert "COPY requirements/pip.txt requirements/runtime.txt requirements/demo.txt ./requirements/" in text
    runs = [line[4:] for line in text.replace("\\\n", " ").splitlines() if line.startswith("RUN ")]
    commands = [c.strip() for run in runs for c in run.split("&&") if "pip install" in c]
    locked = [c for c in commands if "--require-hashes" in c]
    assert [c.split()[-1] for c in locked] == [
        "requirements/pip.txt",
        "requirements/runtime.txt",
        "requirements/demo.txt",
    ]
    assert all("--no-deps -r requirements/" in c for c in locked)
    rest = [c for c in commands if c not in locked]
    assert rest == [
        'pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}"',
        "pip install --no-deps --no-build-isolation .",
    ]
    assert text.index("pip check") < text.index("requirements/demo.txt\n")
