"""What gets installed: every package listed in pyproject.toml, and one version everywhere."""

import importlib.metadata
from pathlib import Path

import pytest

import lightfunc

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "lightfunc").rglob("__init__.py")
    }
    found |= {"lightfunc.kernels"}  # sources in the top-level kernels/ folder
    assert listed == found
    assert config["package-dir"] == {"lightfunc.kernels": "kernels"}
    assert (ROOT / "kernels" / "__init__.py").exists()


def test_the_installed_version_is_the_package_version():
    """`lightfunc.__version__` is read from the installed metadata, which pyproject.toml sets."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert importlib.metadata.version("lightfunc") == lightfunc.__version__ == declared
