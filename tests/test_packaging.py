"""pyproject.toml in the current form: the build gives no deprecation warning."""

from __future__ import annotations

import tomllib
from pathlib import Path

PYPROJECT = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())


def test_the_license_is_an_spdx_expression_which_setuptools_77_reads() -> None:
    # The table form ({ text = "MIT" }) makes setuptools warn on every build (PEP 639).
    assert PYPROJECT["project"]["license"] == "MIT"
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]
