"""Where one training step of ResNet-50 spends its time, and how close it runs to the machine's ceiling.

Profiles our training step (the precision tl_project chooses here, channels-last, SGD
with momentum) on a batch already in memory with `torch.profiler`, and groups the
operators' self time into convolution, BatchNorm, matmul (the head), the optimizer's
fused/foreach kernels (on a CPU, SGD updates run as plain elementwise ops, counted in
"other"), casts and the rest. Data loading and Lightning are not in it: `fit` against
this step is the benchmark's input-pipeline efficiency and Lightning tax. Then the ceiling: the machine's
dense matrix-multiply rate in that precision (a 4096 x 4096 matmul, best of a few)
against ResNet-50's training cost at this size (3 x the forward's multiply-adds x 2
FLOP, counted on the model itself), so "fraction of the ceiling" = measured images/s /
(matmul FLOP/s / FLOP per training image).

    python scripts/profile_step.py                      # 224 px, batch 16
    python scripts/profile_step.py --image_size 128 --steps 5
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

from tl_project.runtime import choose_precision

GROUPS = {
    "convolution": ("conv", "mkldnn_convolution"),
    "BatchNorm": ("batch_norm",),
    "matmul (head)": ("addmm", "mm", "linear"),
    "optimizer (fused/foreach SGD kernels)": ("sgd", "_foreach", "_fused"),
    "casts and copies": ("to", "copy_", "_to_copy", "contiguous", "clone"),
    "activations and pooling": ("relu", "pool", "threshold"),
}


def group_of(name: str) -> str:
    short = name.removeprefix("aten::")
    for group, keys in GROUPS.items():
        if any(short.startswith(key) or key in short for key in keys):
            return group
    return "other (elementwise: residual adds, SGD updates, loss)"


def conv_flops_per_image(model: torch.nn.Module, image_size: int) -> float:
    """FLOP of one forward pass (2 per multiply-add of every Conv2d and Linear), counted with hooks."""
    total = 0.0

    def count(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2.0 * per_output * output[0].numel()
        elif isinstance(module, torch.nn.Linear):
            total += 2.0 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return total


def matmul_flops(dtype: torch.dtype, size: int = 4096, repeats: int = 3) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps, after 2 warm-up steps")
    args = parser.parse_args()

    precision, why = choose_precision("cpu", training=True, batch_size=args.batch_size, batchnorm_trains=True)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    print(f"Precision {precision}: {why}")
    model = torchvision.models.resnet50(num_classes=10).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size).contiguous(
        memory_format=torch.channels_last
    )
    labels = torch.randint(0, 10, (args.batch_size,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    seconds = time.perf_counter() - start
    rate = args.steps * args.batch_size / seconds

    by_group: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_group[group_of(event.key)] += event.self_cpu_time_total
    total = sum(by_group.values())
    print(f"ResNet-50, {args.image_size} px, batch {args.batch_size}: {rate:.2f} images/s under the profiler")
    for group, micros in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<54} {100 * micros / total:5.1f} %")

    flop_per_image = 3 * conv_flops_per_image(torchvision.models.resnet50(num_classes=10), args.image_size)
    peak = matmul_flops(dtype)
    ceiling = peak / flop_per_image
    print(
        f"Ceiling: {dtype} matmul {peak / 1e9:.0f} GFLOP/s, {flop_per_image / 1e9:.1f} GFLOP per training image "
        f"-> {ceiling:.1f} images/s; this step reaches {100 * rate / ceiling:.0f} % of it"
    )


if __name__ == "__main__":
    main()
