"""Multi-label on real images: the tool's mAP against a plain PyTorch BCE loop, and the training
crop, on the grid task of tests/outcome_task.py (56 px pictures of 2 x 2 cells, each empty or
holding a Fashion-MNIST item of five classes; real ImageNet weights, timm's tf_efficientnet_lite0).

    python scripts/multilabel_benchmark.py --out multilabel --seeds 1 2 3

For each seed: the plain loop, the tool with each `--crops` value as --data.min_crop_scale
(`none`: --data.augment false), and the tool along each of `--paths` (tests/outcome_task.py's
MULTILABEL_PATHS, as shipped). Prints mean ± std of the test mAP; writes --out/multilabel.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ is importable from the repository root

from tests.outcome_task import MULTILABEL_PATHS, multilabel_map, plain_multilabel_map, write_grid_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("multilabel"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--crops", nargs="*", default=["0.5", "1.0", "none"], help="min_crop_scale values, or none")
    parser.add_argument("--paths", nargs="*", default=[], choices=list(MULTILABEL_PATHS))
    parser.add_argument("--no-plain", dest="plain", action="store_false", help="leave the plain loop out")
    args = parser.parse_args()
    task = write_grid_task(args.out)
    runs: dict[str, list[float]] = {}

    def measure(name: str, run: object) -> None:
        start = time.perf_counter()
        values = [100 * run(seed) for seed in args.seeds]  # type: ignore[operator]
        runs[name] = values
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        seconds = (time.perf_counter() - start) / len(values)
        each = ", ".join(f"{v:.2f}" for v in values)
        print(
            f"{name:<22} mAP {statistics.mean(values):6.2f} ± {spread:.2f} %  ({each})  {seconds:.0f} s/run", flush=True
        )
        (args.out / "multilabel.json").write_text(json.dumps(runs, indent=1) + "\n")

    if args.plain:
        measure("plain PyTorch loop", lambda seed: plain_multilabel_map(task, seed))
    for crop in args.crops:
        extra = ["--data.augment", "true", "--data.min_crop_scale", crop] if crop != "none" else []
        measure(f"tool, crop {crop}", lambda seed, extra=extra: multilabel_map(task, seed, *extra))
    for name in args.paths:
        measure(f"tool, {name}", lambda seed, name=name: multilabel_map(task, seed, *MULTILABEL_PATHS[name]))
    print(f"Results in {args.out / 'multilabel.json'}")


if __name__ == "__main__":
    main()
