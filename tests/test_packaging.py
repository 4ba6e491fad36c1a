"""The package's metadata holds together: one version (fused_dft.__version__, which pyproject.toml
reads, `fused-dft --version` prints and CHANGELOG.md's newest release names), the console script's
target, the license as an SPDX expression with its file, the extras named for what they enable.
bench/wheel_check.py (make wheel-check, part of make test) builds and installs the wheel itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fused_dft

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_read_from_the_package(pyproject):
    project = pyproject["project"]
    assert "version" not in project and "version" in project["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "fused_dft.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", fused_dft.__version__)


def test_console_script_target(pyproject):
    from fused_dft.tools import cli

    assert pyproject["project"]["scripts"] == {"fused-dft": "fused_dft.tools.cli:main"}
    assert callable(cli.main)


def test_license_is_an_spdx_expression_with_its_file(pyproject):
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0"
    assert all((ROOT / f).is_file() for f in project["license-files"])
    # PEP 639: a license classifier beside an SPDX expression is an error in setuptools
    assert not any(c.startswith("License ::") for c in project["classifiers"])
    (requirement,) = pyproject["build-system"]["requires"]
    assert requirement == "setuptools>=77"  # the first to take an SPDX expression


def test_extras_named_for_what_they_enable(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    assert {"triton", "hf", "trl", "bench", "test"} <= set(extras)
    names = {e: {re.split(r"[<>=\[ ]", r)[0] for r in reqs} for e, reqs in extras.items()}
    assert "triton" in names["triton"]
    assert {"transformers", "accelerate"} <= names["hf"]
    assert {"transformers", "accelerate", "trl"} <= names["trl"]


def test_changelog_names_this_version_as_its_newest_release():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert headings[0] == "Unreleased", headings
    assert headings[1] == fused_dft.__version__, headings
    assert "0.1.0" in headings
