"""What ships: the image installs exactly the locked versions, and the lock covers every
dependency keymount declares."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def locked(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of a pip-compile --generate-hashes file."""
    pins: dict[str, tuple[str, int]] = {}
    name = None
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^ \\]+)", line)
        if match:
            name = match.group(1).lower().replace("_", "-")
            pins[name] = (match.group(2), 0)
        elif name and "--hash=sha256:" in line:
            version, hashes = pins[name]
            pins[name] = (version, hashes + 1)
    return pins


def declared(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["optional-dependencies"][extra] if extra else project["dependencies"]
    return [Requirement(spec) for spec in specs]


def test_the_image_installs_the_lock_with_hashes_and_nothing_else():
    steps = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip().startswith("RUN pip install")]
    assert steps == ["RUN pip install --no-cache-dir --require-hashes -r requirements.lock",
                     "RUN pip install --no-cache-dir --no-deps ."]
    assert "COPY requirements.lock ./" in (ROOT / "Dockerfile").read_text()
    assert "requirements.lock" not in (ROOT / ".dockerignore").read_text().split(
        "# Only")[-1].splitlines()[1:]


@pytest.mark.parametrize(("lock", "extra"), [("requirements.lock", None),
                                             ("requirements-test.lock", "test")])
def test_every_declared_dependency_is_pinned_with_hashes_within_its_range(lock, extra):
    pins = locked(ROOT / lock)
    assert pins and all(hashes >= 1 for _, hashes in pins.values())
    for requirement in declared() + (declared(extra) if extra else []):
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{requirement.name} is not in {lock}"
        assert requirement.specifier.contains(pins[name][0]), (requirement, pins[name])


def test_the_test_environment_runs_the_locked_versions():
    pins = locked(ROOT / "requirements-test.lock")
    for requirement in declared() + declared("test"):
        name = requirement.name.lower().replace("_", "-")
        assert metadata.version(requirement.name) == pins[name][0], name
