"""Inference speed of ResNet-50 on this CPU: which path `predict` should take.

Rows, each over the same real Fashion-MNIST images (Debian's `dataset-fashion-mnist`,
made RGB and resized to --image_size, normalised as predict does), the model in eval
mode with random weights and a 10-class head (the weights do not change the speed):

- PyTorch fp32, default (contiguous) memory format;
- PyTorch fp32, channels-last (what `predict` runs on a CPU today);
- PyTorch bf16 autocast, channels-last (the CPU's fast precision where it has native bf16;
  emulated and slow where it has not);
- ONNX Runtime fp32 of the same network, exported as `python -m tl_project export` does
  (its graph optimisations fuse convolutions with BatchNorm).

Each row: images/s over --batches timed batches of --batch_size after --warmup
untimed ones, with --threads intra-op threads, best of --repeats rounds; and against
PyTorch fp32 (contiguous) on the same images: the largest absolute logit difference,
the largest probability difference and how many top-1 classes differ.

    python scripts/inference_benchmark.py --out docs/inference-cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from benchmark import machine  # scripts/ is on the path
from torch import nn

from tl_project.data.named import read_idx
from tl_project.transforms import IMAGENET_MEAN, IMAGENET_STD


def images(root: Path, count: int, size: int) -> torch.Tensor:
    """`count` Fashion-MNIST test images as a normalised float batch, N x 3 x size x size."""
    pixels = read_idx(root / "t10k-images-idx3-ubyte.gz")[:count]
    batch = pixels[:, None].float().div(255).expand(-1, 3, -1, -1)
    batch = nn.functional.interpolate(batch, size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((batch - mean) / std).contiguous()


def timed(run: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """images/s of `run` over batches of `data` (best round), and its logits of all of `data`."""
    batches = list(data.split(args.batch_size))
    for batch in batches[: args.warmup]:
        run(batch)
    rounds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for batch in batches[args.warmup : args.warmup + args.batches]:
            run(batch)
        rounds.append(args.batches * args.batch_size / (time.perf_counter() - started))
    logits = torch.cat([run(batch).float() for batch in batches])
    return {"images_per_s": round(max(rounds), 2), "rounds": [round(r, 2) for r in rounds], "logits": logits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip", nargs="*", default=[], choices=["bf16", "onnx"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    network = torchvision.models.resnet50(num_classes=10).eval()
    data = images(args.root, (args.warmup + args.batches) * args.batch_size, args.image_size)
    last = network.to(memory_format=torch.channels_last)

    def eager(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return network(batch.contiguous())

    def channels_last(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return last(batch.contiguous(memory_format=torch.channels_last))

    def bf16(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return last(batch.contiguous(memory_format=torch.channels_last))

    rows: dict[str, dict[str, Any]] = {}
    network = network.to(memory_format=torch.contiguous_format)
    rows["pytorch fp32"] = timed(eager, data, args)
    network = network.to(memory_format=torch.channels_last)
    rows["pytorch fp32 channels-last"] = timed(channels_last, data, args)
    if "bf16" not in args.skip:
        rows["pytorch bf16 autocast channels-last"] = timed(bf16, data, args)
    if "onnx" not in args.skip:
        import onnxruntime

        with tempfile.TemporaryDirectory() as folder:
            file = str(Path(folder) / "resnet50.onnx")
            network = network.to(memory_format=torch.contiguous_format)
            dynamic = {"x": {0: torch.export.Dim("batch")}}  # the argument of ResNet.forward
            torch.onnx.export(network, (data[:4],), file, input_names=["images"], dynamic_shapes=dynamic, dynamo=True)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = onnxruntime.InferenceSession(file, options, providers=["CPUExecutionProvider"])
            run = lambda batch: torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])  # noqa: E731
            rows["onnxruntime fp32"] = timed(run, data, args)

    reference = rows["pytorch fp32"]["logits"]
    for row in rows.values():
        logits = row.pop("logits")
        row["max_abs_logit_diff"] = float((logits - reference).abs().max())
        row["max_abs_prob_diff"] = float((logits.softmax(1) - reference.softmax(1)).abs().max())
        row["top1_differs"] = int((logits.argmax(1) != reference.argmax(1)).sum())
        row["images"] = len(logits)
    # The machine record of the other benchmarks; AVX-512 too, as "AMD EPYC" may name either kind.
    avx512 = "avx512f" in Path("/proc/cpuinfo").read_text().split()
    result = {
        "machine": {**machine(), "avx512f": avx512, "threads": args.threads},
        "versions": {"torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("root", "out")},
        "rows": rows,
    }
    if "onnx" not in args.skip:
        result["versions"]["onnxruntime"] = onnxruntime.__version__
    print(f"{'path':<38}{'images/s':>10}{'max |logit diff|':>18}{'top-1 differs':>15}")
    for name, row in rows.items():
        print(f"{name:<38}{row['images_per_s']:>10.2f}{row['max_abs_logit_diff']:>18.2e}{row['top1_differs']:>15}")
    print(json.dumps(result["machine"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
