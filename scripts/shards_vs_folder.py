"""Training from LitData shards against training from the image folder they were written from,
from random initialisation on real Fashion-MNIST images (the outcome tests' scratch task,
tests/outcome_task.py): the same fit and test, from the folder and from `optimize`'s shards,
for each seed.

    python scripts/shards_vs_folder.py --out shards-check --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ is importable from the repository root

from tests.outcome_task import scratch_accuracy, write_scratch_task


def main_check() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("shards-check"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    task = write_scratch_task(args.out)
    for source in ("folder", "shards"):
        values = [100 * scratch_accuracy(source, task, seed) for seed in args.seeds]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"{source}: test accuracy {statistics.mean(values):.2f} ± {spread:.2f} % ({each})", flush=True)


if __name__ == "__main__":
    main_check()
