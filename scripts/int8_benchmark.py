"""int8 on real images: `export --quantize int8` of a checkpoint fine-tuned from real ImageNet
weights, its answers and accuracy against fp32.

    python scripts/int8_benchmark.py --out int8 --image_size 128

Fine-tunes timm's tf_efficientnet_lite0 (the real ImageNet weights, tests/outcome_task.py) on the
outcome task's five look-alike Fashion-MNIST classes (40 images a class, 10 validate, 100 a class
test) at --image_size for --epochs, then exports it to ONNX fp32 and int8 (calibrated on the 50
validation images). Prints what export measured on the 500 test images: the share of int8 answers
equal to fp32's, both accuracies and both speeds; writes --out/int8.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ is importable from the repository root

from tests.outcome_task import BATCH, LR, common_args, real_weights, write_task
from tl_project import main as tool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("int8"))
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    task = write_task(args.out)
    runs = args.out / "runs"
    tool(["fit", *common_args(str(task / "target"), runs, 1, size=args.image_size),
          "--model.weights", str(real_weights(args.out)), "--trainer.max_epochs", str(args.epochs),
          "--data.batch_size", str(BATCH), "--model.optimizer.lr", str(LR)])  # fmt: skip
    ckpt = next(runs.glob("version_*/checkpoints/last.ckpt"))
    target = args.out / "model.int8.onnx"
    target.unlink(missing_ok=True)
    Path(f"{target}.json").unlink(missing_ok=True)
    tool(["export", "--ckpt_path", str(ckpt), "--quantize", "int8", "--output", str(target)])
    measured = json.loads(Path(f"{target}.json").read_text())["quantized"]
    print(json.dumps(measured, indent=1))
    (args.out / "int8.json").write_text(json.dumps(measured, indent=1) + "\n")


if __name__ == "__main__":
    main()
