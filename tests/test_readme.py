"""The README's configuration table is the code's: it cannot drift."""

from pathlib import Path

from sse_twisted._config import SETTINGS

README = Path(__file__).parent.parent / "README.md"


def settings_rows() -> list[str]:
    return [
        f"| `{setting.env}` | `--{setting.option}` | "
        f"{'`' + setting.default + '`' if setting.default else '(empty)'} | {setting.help} |"
        for setting in SETTINGS
    ]


def test_the_readme_lists_every_setting_as_the_code_defines_it() -> None:
    lines = README.read_text().splitlines()
    start = lines.index("|---|---|---|---|") + 1
    table = lines[start : start + len(SETTINGS) + 1]
    assert table[: len(SETTINGS)] == settings_rows()
    assert not table[-1].startswith("|"), "the README lists a setting the code does not have"


if __name__ == "__main__":
    print("\n".join(settings_rows()))
