"""The README and the documentation site: short, built strictly, and a reference that lists
every option of every command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tl_project.cli import COMMANDS
from tl_project.reference import help_text, page, pages

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_is_short_and_its_quickstart_has_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12_000
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"(?m)^    make (\w+)", quickstart) == ["fit", "test"]
    for link in re.findall(r"\]\((docs/[^)#]+|CONTRIBUTING\.md)", readme):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: a broken link or a page missing from the files fails."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in COMMANDS:
        assert (tmp_path / "site" / "reference" / name / "index.html").is_file()


def test_every_written_page_is_in_the_navigation() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))

    def walk(items: list) -> list[str]:
        found = []
        for item in items:
            values = item.values() if isinstance(item, dict) else [item]
            for value in values:
                found += walk(value) if isinstance(value, list) else [value]
        return found

    listed = set(walk(config["nav"]))
    written = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    generated = {*pages(), "contributing.md"}
    assert written | generated == listed


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_reference_lists_every_option_of_the_command(command: str) -> None:
    text = help_text(command)
    options = set(re.findall(r"(?m)^  ARG:\s+(?:-\w, )?(--[\w.-]+)", text))
    assert len(options) > 2
    reference = page(command)
    missing = sorted(option for option in options if f"`{option}" not in reference)
    assert not missing, f"the reference page of {command} lacks {missing}"


def test_help_leads_with_the_tools_own_options_in_its_own_words() -> None:
    text = help_text("fit")
    assert text.index("ARG:   --model.backbone") < text.index("ARG:   --data.root") < text.index("ARG:   --trainer.")
    checkpoint = text.split("ARG:   --ckpt_path", 1)[1].split("ARG:", 1)[0]
    assert "resume" in checkpoint and "registry" not in checkpoint and "hpc" not in checkpoint
    weights_only = text.split("ARG:   --weights_only", 1)[1].split("ARG:", 1)[0]
    assert "never code" in weights_only and "use ``weights_only=False``" not in weights_only
