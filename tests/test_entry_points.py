"""Every command-line entry point parses its options: ``--help`` prints usage, exits 0 and
does nothing else (no directory named ``--help``, no connection attempt)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import sse_twisted
from tests.twistd_processes import TWISTD

PACKAGE = Path(sse_twisted.__file__).parent
MODULES = sorted(
    f"sse_twisted.{path.stem}"
    for path in PACKAGE.glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)


def test_the_package_has_the_entry_points_this_file_checks() -> None:
    assert MODULES == ["sse_twisted.devcerts", "sse_twisted.publish"]


@pytest.mark.parametrize(
    "command",
    [[sys.executable, "-m", module] for module in MODULES] + [[str(TWISTD), "sse-server"]],
    ids=[*MODULES, "twistd sse-server"],
)
def test_help_prints_usage_and_does_nothing_else(command: list[str], tmp_path: Path) -> None:
    result = subprocess.run(
        [*command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.lower().startswith("usage:")
    assert list(tmp_path.iterdir()) == []


def test_devcerts_without_a_directory_is_a_usage_error_that_creates_nothing(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sse_twisted.devcerts"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "the following arguments are required: DIRECTORY" in result.stderr
    assert list(tmp_path.iterdir()) == []
