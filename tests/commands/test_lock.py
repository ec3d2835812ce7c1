"""The lock in requirements/ (docs/install.md): every dependency pyproject.toml names is pinned at a version
its range accepts, every pin carries hashes, torch and CUDA's libraries stay out, and the files agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements"
LOCKS = ["pip.txt", "runtime.txt", "dev.txt", "demo.txt"]
SHA256 = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def read_lock(name: str) -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, hashes) of one lock file as pip-compile writes it."""
    path = REQUIREMENTS / name
    entries: dict[str, tuple[Version, list[str]]] = {}
    hashes: list[str] | None = None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip().removesuffix("\\").strip()
        if not text or text.startswith("#"):
            hashes = None
        elif text.startswith("--hash="):
            assert hashes is not None, f"{name}:{number}: a hash outside a requirement"
            assert SHA256.fullmatch(text), f"{name}:{number}: {text}"
            hashes.append(text)
        else:
            assert not line[0].isspace() and not text.startswith("-"), f"{name}:{number}: {line!r}"
            req = Requirement(text)
            (spec,) = req.specifier
            assert spec.operator == "==" and "*" not in spec.version, f"{name}:{number}: not exact: {text}"
            key = canonicalize_name(req.name)
            assert key not in entries, f"{name}:{number}: {key} pinned twice"
            hashes = []
            entries[key] = (Version(spec.version), hashes)
    return entries


def pyproject(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def requirements_of(project: dict, *extras: str) -> list[Requirement]:
    """A project's requirements (and those of the given extras) that apply on this machine."""
    texts = list(project["project"].get("dependencies", []))
    for extra in extras:
        texts += project["project"]["optional-dependencies"][extra]
    reqs = [Requirement(text) for text in texts]
    return [req for req in reqs if req.marker is None or req.marker.evaluate({"extra": ""})]


ROOT_PROJECT = pyproject(ROOT / "pyproject.toml")
CLIENT_PROJECT = pyproject(ROOT / "clients" / "pyproject.toml")
ALL_EXTRAS = sorted(ROOT_PROJECT["project"]["optional-dependencies"])

# what each lock must pin, besides torch (kept out of them all)
EXPECTED = {
    # what the images run: the dependencies and --quantize (bitsandbytes runs on CPU as on CUDA); the
    # CUDA image's triton comes with its CUDA torch, at the pin the gpu extra names
    "runtime.txt": requirements_of(ROOT_PROJECT, "quantize"),
    # what make test installs: every extra, the client, and the build backend of both projects
    "dev.txt": requirements_of(ROOT_PROJECT, *ALL_EXTRAS)
    + requirements_of(CLIENT_PROJECT)
    + [Requirement(t) for t in ROOT_PROJECT["build-system"]["requires"]]
    + [Requirement(t) for t in CLIENT_PROJECT["build-system"]["requires"]],
}


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_is_exact_and_carries_hashes(name):
    entries = read_lock(name)
    assert entries, f"{name} pins nothing"
    for package, (_, hashes) in entries.items():
        assert hashes, f"{name}: {package} has no hash"


@pytest.mark.parametrize("name", LOCKS)
def test_torch_and_cuda_libraries_stay_out_of_the_lock(name):
    for package in read_lock(name):
        assert package != "torch", f"{name} pins torch: the Makefile and the images install it"
        assert not package.startswith(("nvidia-", "cuda-")), f"{name} pins {package}: CUDA torch leaked in"


def test_the_runtime_lock_has_no_triton_for_the_cpu_image():
    assert "triton" not in read_lock("runtime.txt")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_dependency_named_in_pyproject_is_pinned_within_its_range(name):
    entries = read_lock(name)
    for req in EXPECTED[name]:
        package = canonicalize_name(req.name)
        if package == "torch":
            continue
        assert package in entries, f"{name} lacks {req}: run make lock"
        version, _ = entries[package]
        assert req.specifier.contains(version, prereleases=True), f"{name}: {package}=={version} breaks {req}"


def test_the_locks_agree():
    runtime, dev, pip = read_lock("runtime.txt"), read_lock("dev.txt"), read_lock("pip.txt")
    assert set(runtime) <= set(dev), f"dev.txt lacks {sorted(set(runtime) - set(dev))}"
    for package, (version, hashes) in runtime.items():
        assert dev[package][0] == version, f"{package}: runtime.txt {version}, dev.txt {dev[package][0]}"
        assert sorted(dev[package][1]) == sorted(hashes), f"{package}: the two locks' hashes differ"
    assert set(pip) == {"pip"}
    assert pip["pip"][0] == dev["pip"][0]


def _makefile_value(variable: str) -> str:
    match = re.search(rf"^{variable} \?= (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"the Makefile sets no {variable}"
    return match.group(1).strip()


def test_torch_is_resolved_as_the_version_the_makefile_and_the_images_install():
    (line,) = [
        text for text in (REQUIREMENTS / "torch.in").read_text().splitlines() if text and text[0] != "#"
    ]
    resolved = Version(next(iter(Requirement(line).specifier)).version)
    assert resolved.local == "cpu"  # its metadata names no CUDA libraries
    makefile = Requirement(_makefile_value("TORCH"))
    assert makefile.specifier.contains(resolved) and str(makefile.specifier) == f"=={resolved.public}"
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        assert f'"torch=={resolved.public}"' in (ROOT / "docker" / dockerfile).read_text()
    (torch,) = [req for req in requirements_of(ROOT_PROJECT) if req.name == "torch"]
    assert torch.specifier.contains(resolved)


def test_the_demo_lock_pins_the_makefiles_demo_backbone():
    demo = read_lock("demo.txt")
    wanted = Requirement(_makefile_value("DEMO"))
    assert set(demo) == {canonicalize_name(wanted.name)}
    assert wanted.specifier.contains(demo[canonicalize_name(wanted.name)][0])


def test_make_install_installs_from_the_lock_and_reruns_when_it_changes():
    text = (ROOT / "Makefile").read_text()
    lock = re.search(r"^LOCK := (.+)$", text, re.MULTILINE).group(1).split()
    assert sorted(lock) == sorted(f"requirements/{name}" for name in LOCKS)
    rule = re.search(r"^\$\(VENV\)/\.installed: (.+)$\n((?:\t.+\n)+)", text, re.MULTILINE)
    assert "$(LOCK)" in rule.group(1).split()
    recipe = rule.group(2)
    for name in ("pip.txt", "dev.txt", "demo.txt"):
        assert f"--require-hashes --no-deps -r requirements/{name}" in recipe
    installs = [line for line in recipe.splitlines() if " install " in line]
    unlocked = [line for line in installs if "--require-hashes" not in line and "--no-deps" not in line]
    assert unlocked == ["\t$(PIP) install --quiet $(TORCH)"]
