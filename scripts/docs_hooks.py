"""MkDocs hooks of the documentation site (mkdocs.yml): pages made at build time.

- `reference/*.md`: one page per command, from the parsers that `--help` prints
  (`tl_project.reference`), so the reference cannot drift from the code;
- `contributing.md`: the repository's CONTRIBUTING.md, one text for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

from tl_project.reference import pages


def on_files(files: Files, config: Any) -> Files:
    root = Path(config["config_file_path"]).parent
    contributing = (root / "CONTRIBUTING.md").read_text().replace("](docs/", "](")
    files.append(File.generated(config, "contributing.md", content=contributing))
    for path, content in pages().items():
        files.append(File.generated(config, path, content=content))
    return files
