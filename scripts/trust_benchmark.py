"""Trust each answer, measured on real images: calibration, the answer threshold and the maps,
on the quadrant task of tests/outcome_task.py (one Fashion-MNIST item of five look-alike classes
in a random quadrant of a blank 56 px picture; real ImageNet weights, timm's tf_efficientnet_lite0).

    python scripts/trust_benchmark.py --out trust --seeds 1 2 3 --picture docs/images/trust_maps.png

For each seed: fit with --model.target_accuracy (tests/outcome_task.py's TARGET_ACCURACY), test,
and predict the test images with --explain. Prints the test accuracy, the expected calibration
error before and after the temperature, the coverage and accuracy of the answered test images,
and the share of correct answers whose map peaks in the item's quadrant; writes --out/trust.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ is importable from the repository root

from tests.outcome_task import TARGET_ACCURACY, real_weights, trust_outcomes, write_quadrant_task

SHOWN = ("accuracy", "ece_uncalibrated", "ece", "temperature", "min_probability", "coverage", "accuracy_answered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("trust"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--picture", type=Path, help="draw the first seed's maps of eight test images here")
    parser.add_argument("extra", nargs="*", help="more fit flags (after --)")
    args = parser.parse_args()
    # The conversions predict makes (and the data check's manifests) stay under --out.
    os.environ["XDG_CACHE_HOME"] = str((args.out / "cache").resolve())
    task = write_quadrant_task(args.out)
    weights = real_weights(args.out)
    results = []
    for seed in args.seeds:
        start = time.perf_counter()
        picture = args.picture if seed == args.seeds[0] else None
        result = trust_outcomes(task, weights, seed, picture, *args.extra)
        result["seconds"] = time.perf_counter() - start
        results.append(result)
        print(f"seed {seed}: " + ", ".join(f"{k} {result[k]:.3f}" for k in (*SHOWN, "maps_on_item")), flush=True)
        print(
            f"  {result['answered']} test images answered, {result['correct']} correct; {result['seconds']:.0f} s",
            flush=True,
        )
        (args.out / "trust.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"target accuracy {TARGET_ACCURACY}; mean ± std over seeds {args.seeds}:")
    for key in (*SHOWN, "maps_on_item"):
        values = [r[key] for r in results]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {key:<18} {statistics.mean(values):.3f} ± {spread:.3f}")


if __name__ == "__main__":
    main()
