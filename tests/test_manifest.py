"""The data check's manifest: unchanged files are not looked at again, changed and added
ones are, removed ones are forgotten; the work is shared out between processes."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
import torch.distributed as dist

from tests import processes
from tests.conftest import COLORS, make_image_folder
from tl_project import ImageDataModule
from tl_project.data import checks
from tl_project.data.checks import check_images, inspect_file, inspect_files
from tl_project.data.manifest import Manifest


@pytest.fixture
def looked_at(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths the check looks at (in this process), in order."""
    seen: list[Path] = []

    def recording(path: str | Path, level: str = "full", max_pixels: int = 89_478_485) -> checks.Inspection:
        seen.append(Path(path))
        return inspect_file(path, level, max_pixels)

    monkeypatch.setattr(checks, "inspect_file", recording)
    return seen


def _data(root: Path, **kwargs: object) -> ImageDataModule:
    options = {"dataset": None, "root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0, **kwargs}
    return ImageDataModule(**options)  # type: ignore[arg-type]


def test_second_check_of_an_unchanged_folder_looks_at_nothing(tmp_path: Path, looked_at: list[Path]) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    _data(root).setup("fit")
    assert len(looked_at) == 30  # every image once: train, val and test
    looked_at.clear()
    _data(root).setup("fit")
    _data(root).setup("test")
    assert looked_at == []


def test_changed_added_and_removed_files(tmp_path: Path, looked_at: list[Path]) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    _data(root).setup("fit")
    looked_at.clear()
    changed, added, removed = root / "cat" / "001.png", root / "dog" / "new.png", root / "fish" / "009.png"
    changed.write_bytes(b"")  # now empty: must be found
    shutil.copy(root / "dog" / "000.png", added)
    removed.unlink()
    data = _data(root, on_bad_image="skip")
    data.setup("fit")
    assert sorted(looked_at) == sorted([changed, added])
    rows = Manifest(root).rows
    assert len(rows) == 30 and "fish/009.png" not in rows and rows["cat/001.png"][3] == "empty"


def test_the_manifest_lives_in_the_cache_folder_not_the_data(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    os.chmod(root, 0o555)  # a read-only data folder
    try:
        _data(root, cache_dir=str(tmp_path / "cache")).setup("fit")
    finally:
        os.chmod(root, 0o755)
    [manifest] = (tmp_path / "cache" / "checks").glob("*.sqlite")
    assert str(root).encode() in manifest.read_bytes()
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == sorted([f"{i:03d}.png" for i in range(10)] * 3)


def test_test_checks_only_the_test_split(tmp_path: Path, looked_at: list[Path]) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    data = _data(root)
    data.setup("test")
    assert sorted(looked_at) == sorted(Path(p) for p, _ in data.datasets["test"].samples)  # type: ignore[attr-defined]
    assert set(data.datasets) == {"test"}


def test_a_raised_pixel_limit_rechecks_the_refused_images(tmp_path: Path, looked_at: list[Path]) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=3)
    manifest = Manifest(root)
    splits = {"train": [(str(p), 0) for p in sorted(root.rglob("*.png"))]}
    assert len(check_images(splits, ["x"], max_pixels=100, manifest=manifest).problems) == 9
    looked_at.clear()
    assert not check_images(splits, ["x"], max_pixels=10**6, manifest=Manifest(root)).problems
    assert len(looked_at) == 9  # refused unread before: decoded now
    looked_at.clear()
    assert len(check_images(splits, ["x"], max_pixels=100, manifest=Manifest(root)).problems) == 9
    assert looked_at == []  # known size: refused from the manifest


def test_an_unreadable_manifest_is_rebuilt_with_a_warning(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    _data(root).setup("fit")
    Manifest(root).file.write_text("not a database")
    _data(root).setup("fit")
    assert "manifest" in capfd.readouterr().err and len(Manifest(root).rows) == 30


def test_same_size_new_time_is_looked_at_and_old_manifests_are_replaced(tmp_path: Path, looked_at: list[Path]) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    earlier = Manifest(root).file.with_suffix(".json")  # what an earlier version wrote
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"version": 2, "files": {}}')
    _data(root).setup("fit")
    assert not earlier.exists()
    looked_at.clear()
    touched = root / "dog" / "004.png"
    os.utime(touched, ns=(0, touched.stat().st_mtime_ns + 1))  # same bytes, another time: looked at
    _data(root).setup("fit")
    assert looked_at == [touched]
    with sqlite3.connect(Manifest(root).file) as connection:  # a manifest of another version is not trusted
        connection.execute("UPDATE meta SET value = '0' WHERE key = 'version'")
    looked_at.clear()
    _data(root).setup("fit")
    assert len(looked_at) == 30 and len(Manifest(root).rows) == 30


def test_worker_processes_find_what_one_process_finds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=4)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = sorted(map(str, root.rglob("*.png")))
    monkeypatch.setattr(checks, "PARALLEL_FROM", 1)
    assert inspect_files(paths, "full", 10**8, workers=2) == [inspect_file(p) for p in paths]


def rank_inspects(rank: int, paths: list[str], init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mine: list[str] = []
    checks.inspect_file = lambda path, *args, **kwargs: mine.append(str(path)) or inspect_file(path, *args, **kwargs)  # type: ignore[assignment]
    results = inspect_files(paths, "full", 10**8)
    (Path(out) / f"rank{rank}.txt").write_text("\n".join(mine))
    (Path(out) / f"rank{rank}-problems.txt").write_text("\n".join(str(r.problem) for r in results))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_processes_share_the_check_and_all_get_every_result(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=3)
    (root / "dog" / "empty.png").write_bytes(b"")
    paths = sorted(root.rglob("*.png"))
    init_file = tempfile.mktemp(dir=tmp_path)
    ranks = [processes.start_call(rank_inspects, r, list(map(str, paths)), init_file, str(tmp_path)) for r in (0, 1)]
    assert [rank.wait(timeout=120) for rank in ranks] == [0, 0]
    shares = [set((tmp_path / f"rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == {str(p) for p in paths}
    expected = "\n".join(str(inspect_file(p).problem) for p in paths)
    assert (tmp_path / "rank0-problems.txt").read_text() == expected == (tmp_path / "rank1-problems.txt").read_text()


def test_an_unchanged_folder_is_answered_by_its_saved_report(tmp_path: Path, looked_at: list[Path]) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=4)
    shutil.copy(root / "dog" / "000.png", root / "cat" / "copy.png")  # a duplicate: a warning to keep
    splits = {"train": [(str(p), 0) for p in sorted(root.rglob("*.png"))]}
    first = check_images(splits, ["x"], max_pixels=10**6, manifest=Manifest(root))
    assert [w.kind for w in first.warnings] == ["duplicate"]
    looked_at.clear()
    manifest = Manifest(root)
    assert check_images(splits, ["x"], max_pixels=10**6, manifest=manifest) == first
    assert "rows" not in vars(manifest) and looked_at == []  # not one row read
    assert check_images(splits, ["x"], max_pixels=100, manifest=Manifest(root)) != first  # other settings
    touched = root / "fish" / "001.png"
    os.utime(touched, ns=(0, touched.stat().st_mtime_ns + 1))
    looked_at.clear()
    manifest = Manifest(root)
    assert check_images(splits, ["x"], max_pixels=10**6, manifest=manifest) == first
    assert "rows" in vars(manifest) and looked_at == [touched]  # the changed file, looked at again
