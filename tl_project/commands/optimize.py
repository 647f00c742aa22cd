"""`optimize`: an image folder's splits (and --data.predict_dir) as LitData shards."""

from __future__ import annotations

from pathlib import Path

from tl_project.data.streaming import META, is_url, require_litdata, write_shards
from tl_project.errors import UserError
from tl_project.launch import launched
from tl_project.lightning_cli import data_module
from tl_project.runtime import say, usable_cores


def run(command: str, args: list[str], description: str, from_sys_argv: bool) -> None:
    """`optimize`: an image folder's splits (and --data.predict_dir) as LitData shards."""
    with launched(command, args, from_sys_argv) as args:
        output_help = "Where the shards go: a new or earlier shards folder, or a URL LitData writes to (s3://...)."
        data, config = data_module(command, description, args, **{"--output": {"required": True, "help": output_help}})
        require_litdata("optimize")
        output = str(config.output)
        if not is_url(output):
            target = Path(output).expanduser()
            if target.exists() and any(target.iterdir()) and not (target / META).is_file():
                raise UserError(f"{target} exists and holds other files; pass a new --output folder.")
            target.mkdir(parents=True, exist_ok=True)
            output = str(target)
        data.setup("optimize")
        splits = {split: data.datasets[split].samples for split in ("train", "val", "test")}
        if data.predict_dir:
            data.setup("predict")
            splits["predict"] = [(path, -1) for path in data.predict_paths]
        settings = {"source": str(data.root), "val_split": data.val_split, "test_split": data.test_split}
        label_sets = data.source.label_sets if data.multi_label else None  # type: ignore[union-attr]
        sizes = write_shards(
            splits, data.class_names, output, data.root, usable_cores(), data.seed, settings, label_sets
        )
        say(
            f"Wrote {', '.join(f'{split} {n}' for split, n in sizes.items())} images to {output}. "
            f"Use them with --data.dataset litdata --data.root {output}"
        )
