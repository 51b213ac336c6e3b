"""What ships: the image installs exactly the locked versions, and the lock covers every
dependency keymount declares."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
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


def image_sources() -> list[str]:
    """What the Dockerfile copies into the build stage before `pip install .`."""
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not words[1].startswith("--"):
            sources.extend(word.rstrip("/") for word in words[1:-1])
    return [source for source in sources if source != "requirements.lock"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from exactly what the image build copies."""
    source = tmp_path_factory.mktemp("source")
    for name in image_sources():
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                    "--no-cache-dir", str(source), "-w", str(source / "dist")],
                   check=True, timeout=300)
    (built,) = (source / "dist").glob("keymount-*.whl")
    return built


def test_the_image_copies_both_packages():
    assert sorted(image_sources()) == ["README.md", "keymount", "pyproject.toml", "webhook"]


@pytest.mark.parametrize("member", ["keymount/__init__.py", "keymount/reader.py",
                                    "keymount/keyrule.py", "keymount/example.py",
                                    "webhook/keys.py", "webhook/cli.py"])
def test_the_distribution_ships_the_webhook_and_the_application_reader(wheel, member):
    assert member in zipfile.ZipFile(wheel).namelist()


def test_the_reader_runs_from_the_wheel_installed_without_any_dependency(wheel, tmp_path):
    """keymount.reader needs the standard library alone: installed with --no-deps into
    an empty virtualenv, it reads a key directory."""
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    # Not the source tree on PYTHONPATH: the venv must see only what the wheel installed.
    alone = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--quiet", "--no-index",
                    str(wheel)], check=True, timeout=300, env=alone)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "encryption-key-4").write_bytes(bytes(range(32)))
    read = subprocess.run(
        [python, "-c", "import sys, keymount.reader as r; print(r.__file__); "
                       "n, key = r.KeyDirectory(sys.argv[1]).active(); print(n, len(key))",
         tmp_path / "keys"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=alone)
    assert (read.returncode, read.stderr) == (0, ""), read.stderr
    where, found = read.stdout.splitlines()
    assert Path(where).is_relative_to(tmp_path / "venv") and found == "4 32"
