"""The package list in pyproject.toml names every package, so wheels and editable installs ship them all."""

from pathlib import Path

import pytest

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
