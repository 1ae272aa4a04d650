"""requirements/lock.txt against pyproject.toml: every install takes its versions from the lock, so they must agree.

A package pyproject asks for and the lock does not pin would be resolved afresh on every new machine (the way a new
pytest broke the suite); a pin outside its range would make the install fail; a pin nothing needs is dead weight that
hides what the project depends on. The installed environment is the evidence: CI installs with the lock, so what is
installed must be exactly what the lock says.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
# Extras whose packages cannot be installed beside the test environment's (onnxruntime-gpu owns the module
# onnxruntime does): pinned and range-checked, but their dependencies are not walked here (scripts/lock.sh resolves
# the gpu install against the lock when it writes it).
APART = ("gpu",)


def lock_pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.!]+)", line)
        assert match, f"lock.txt:{number}: {line!r} is not NAME==VERSION"
        name = canonicalize_name(match[1])
        assert name not in pins, f"lock.txt:{number}: {name} pinned twice"
        pins[name] = Version(match[2])
    return pins


def requirements(extras: tuple[str, ...] | None = None) -> list[Requirement]:
    """pyproject's own requirements (no self-references), of the given extras or of all of them."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    chosen = optional if extras is None else {e: optional[e] for e in extras}
    found = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    found += [Requirement(r) for reqs in chosen.values() for r in reqs]
    return [r for r in found if canonicalize_name(r.name) != PROJECT and (r.marker is None or r.marker.evaluate())]


def closure(roots: list[Requirement]) -> set[str]:
    """Every distribution the roots pull in, from the installed metadata, with extras and markers honoured."""
    extras_of: dict[str, set[str]] = {}
    stack = list(roots)
    while stack:
        requirement = stack.pop()
        name = canonicalize_name(requirement.name)
        wanted = set(requirement.extras)
        if name in extras_of and wanted <= extras_of[name]:
            continue
        extras_of[name] = extras_of.get(name, set()) | wanted
        try:
            declared = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is required but not installed: install with requirements/lock.txt")
        for line in declared:
            dependency = Requirement(line)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in extras_of[name] | {""}):
                stack.append(dependency)
    return set(extras_of)


def test_every_requirement_is_pinned_within_its_range() -> None:
    pins = lock_pins()
    problems = []
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement} is not pinned")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement}: the lock pins {pins[name]}")
    assert not problems, problems


def test_build_requirements_are_the_locked_versions() -> None:
    """pip's -c does not reach the isolated build environment, so pyproject pins the build tools itself."""
    pins = lock_pins()
    for line in PYPROJECT["build-system"]["requires"]:
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"build requirement {line} must be pinned (==)"
        assert Version(spec.version) == pins[canonicalize_name(requirement.name)], line


def test_the_lock_pins_exactly_what_pyproject_needs() -> None:
    pins = lock_pins()
    installable = tuple(e for e in PYPROJECT["project"]["optional-dependencies"] if e not in APART)
    needed = closure(requirements(installable))
    apart = {canonicalize_name(r.name) for e in APART for r in requirements((e,))}
    assert sorted(needed - set(pins)) == [], "installed as dependencies but not pinned: run scripts/lock.sh"
    assert sorted(set(pins) - needed - apart) == [], "pinned but nothing in pyproject.toml needs them"


def test_the_environment_was_installed_from_the_lock() -> None:
    """What the tests run on is what the lock says: the lock's versions are the ones that passed."""
    drift = {}
    for name, pinned in lock_pins().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue  # the gpu extra's packages, not installable beside the cpu engine
        if Version(installed.public) != pinned:
            drift[name] = f"installed {installed}, locked {pinned}"
    assert not drift, drift


def test_the_gpu_extra_never_installs_onnxruntime_beside_onnxruntime_gpu() -> None:
    names = {canonicalize_name(r.name) for r in requirements(("gpu",))}
    base = {canonicalize_name(r.name) for r in requirements(())}
    assert "onnxruntime-gpu" in names
    assert "onnxruntime" not in base, "the serving install must leave the engine to the cpu or gpu extra"
