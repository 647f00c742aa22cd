"""The seed spread of every training path on the outcome tests' task (tests/outcome_task.py):
what the tolerance of tests/test_outcomes.py is justified by.

    python scripts/outcome_spread.py --out spread --seeds 1 2 3 4 5
    python scripts/outcome_spread.py --out spread --paths plain shards strong_recipe

Converts the real ImageNet weights once (scripts/real_weights.py), then fine-tunes along each
path for each seed and prints each path's test accuracy: mean ± std and every seed's.
`--weights null` measures random initialisation instead. Writes --out/spread.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ is importable from the repository root

from tests.outcome_task import PATHS, real_weights, run_path, write_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("spread"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--weights", help="null for random initialisation (else the real weights)")
    args = parser.parse_args()
    task = write_task(args.out)
    weights = args.weights or real_weights(args.out)
    results: dict[str, dict] = {"weights": str(weights)}
    for name in args.paths:
        start = time.perf_counter()
        values = [100 * run_path(name, task, weights, seed) for seed in args.seeds]
        results[name] = {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "each": values,
            "seconds_per_run": (time.perf_counter() - start) / len(values),
        }
        r = results[name]
        print(
            f"{name:<18} {r['mean']:6.2f} ± {r['std']:.2f} %  ({', '.join(f'{v:.2f}' for v in values)})  {r['seconds_per_run']:.0f} s/run",
            flush=True,
        )
        (args.out / "spread.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"Results in {args.out / 'spread.json'}")


if __name__ == "__main__":
    main()
