"""Benchmark `serve`: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients over real
image files, with and without batching, against the model's own images/s on the same files.

    python scripts/serve_benchmark.py --backbone resnet50 --images 64 --requests 96

It writes 300 px JPEGs made from real Fashion-MNIST images (Debian's dataset-fashion-mnist),
builds a checkpoint of `--backbone` (random weights: the speed is the same), and for each
server setting starts `python -m tl_project serve` as a user would, drives it with
multipart uploads from `--clients` threads and stops it with SIGTERM. Every answer is
compared with the in-process model's prediction for the same file (the model path of
`predict`: decoding, preprocessing, fp32, batch 16), which also gives the images/s to
compare against. `--onnx` also serves the exported .onnx file. Prints one JSON line per
setting and a table; everything it writes goes to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tl_project.classifier import Classifier  # noqa: E402
from tl_project.cli import main  # noqa: E402
from tl_project.data.images import decode_image_bytes  # noqa: E402
from tl_project.data.named import read_named  # noqa: E402
from tl_project.runtime import cpu_has_native_bf16  # noqa: E402
from tl_project.transforms import eval_transform  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_images(folder: Path, count: int) -> list[Path]:
    """`count` 300 px RGB JPEGs of real Fashion-MNIST test images, in two class folders."""
    images, labels = read_named("FashionMNIST", FASHION, train=False)
    paths = []
    for i in range(count):
        label = int(labels[i]) % 2
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        pixels = images[i].numpy() if images[i].ndim == 2 else images[i].squeeze(0).numpy()
        image = Image.fromarray(pixels.astype(np.uint8)).convert("RGB").resize((300, 300), Image.BILINEAR)
        path = folder / f"class{label}" / f"{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def make_checkpoint(folder: Path, runs: Path, backbone: str) -> Path:
    main(
        [
            "fit",
            *("--model.backbone", backbone, "--model.weights", "null"),
            *("--data.dataset", "null", "--data.root", str(folder), "--data.batch_size", "8"),
            *("--data.num_workers", "0", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1"),
            *("--trainer.default_root_dir", str(runs), "--trainer.enable_progress_bar", "false"),
        ]
    )
    return next(runs.glob("version_*/checkpoints/last.ckpt"))


def model_path_speed(model_file: Path, paths: list[Path]) -> tuple[float, dict[str, str]]:
    """The in-process model path over the files (decode, preprocess, fp32 forward, batch 16):
    images/s of the second pass (the first warms up), and each file's class."""
    classifier = Classifier(str(model_file), "cpu")
    transform = eval_transform(classifier.image_size, classifier.preprocessing)
    classes: dict[str, str] = {}
    elapsed = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, len(paths), 16):
            batch = paths[i : i + 16]
            images = torch.stack(
                [transform(decode_image_bytes(torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8), str(p)))
                 for p in batch]
            )  # fmt: skip
            top = classifier.probabilities(images).argmax(dim=1).tolist()
            classes |= {str(p): classifier.classes[c] for p, c in zip(batch, top, strict=True)}
        elapsed = time.perf_counter() - start
    return len(paths) / elapsed, classes


# What a user writes by hand from LitServe's image-classification guide: PIL decoding, torchvision
# transforms, the network in fp32, LitServe's batching; the same network as the checkpoint.
HANDWRITTEN = """
import io, sys
import litserve as ls, torch
from PIL import Image
from torchvision import transforms
from tl_project.model import TransferLearningModel

class ImageClassifierAPI(ls.LitAPI):
    def setup(self, device):
        model = TransferLearningModel.load_from_checkpoint(sys.argv[1], weights=None, map_location="cpu")
        self.model = torch.nn.Sequential(model.backbone, model.head).eval()
        self.classes = model.class_names
        self.transform = transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ])

    def decode_request(self, request):
        return self.transform(Image.open(io.BytesIO(request["file"].file.read())).convert("RGB"))

    def batch(self, inputs):
        return torch.stack(inputs)

    @torch.inference_mode()
    def predict(self, x):
        single = x.ndim == 3  # max_batch_size 1: LitServe passes one image, unbatched
        top = self.model(x.unsqueeze(0) if single else x).softmax(dim=1).argmax(dim=1)
        return top[0] if single else top

    def unbatch(self, output):
        return output.tolist()

    def encode_response(self, output):
        return {"prediction": self.classes[int(output)]}

if __name__ == "__main__":
    server = ls.LitServer(ImageClassifierAPI(max_batch_size=int(sys.argv[3]), batch_timeout=float(sys.argv[4])),
                          accelerator="cpu")
    server.run(port=int(sys.argv[2]), generate_client_file=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    model_file: Path, log: Path, size: str, timeout: str, handwritten: bool = False
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if handwritten:
        script = log.parent / "handwritten_server.py"
        script.write_text(HANDWRITTEN)
        command = [sys.executable, str(script), str(model_file), str(port), size, timeout]
    else:
        command = [sys.executable, "-m", "tl_project", "serve", "--ckpt_path", str(model_file), "--port", str(port)]
        command += ["--max_batch_size", size, "--batch_timeout", timeout]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve exited:\n{log.read_text()}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"serve did not start:\n{log.read_text()}")


def drive(url: str, paths: list[Path], clients: int, requests_total: int, expected: dict[str, str]) -> dict:
    """`requests_total` uploads from `clients` threads (each with its own connection)."""
    work = [paths[i % len(paths)] for i in range(requests_total)]
    payloads = {str(p): p.read_bytes() for p in paths}

    def one(path: Path) -> tuple[float, int, bool]:
        start = time.perf_counter()
        answer = requests.post(f"{url}/predict", files={"file": (path.name, payloads[str(path)])}, timeout=600)
        latency = time.perf_counter() - start
        same = answer.status_code == 200 and answer.json()["prediction"] == expected[str(path)]
        return latency, answer.status_code, same

    for path in paths[: min(4, len(paths))]:  # warm-up
        one(path)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, work))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "requests": requests_total,
        "requests_per_s": round(requests_total / wall, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "errors": sum(r[1] != 200 for r in results),
        "differ_from_model": sum(not r[2] for r in results),
    }


def serve_runs(
    kind: str, model_file: Path, base: Path, paths: list[Path], expected: dict[str, str], args: Any, handwritten: bool
) -> list[dict]:
    """Each batching setting of `args`: a server started, driven at each client count, stopped."""
    rows = []
    for setting in args.batching:
        size, timeout = setting.split(":")
        process, url = start_server(model_file, base / "serve.log", size, timeout, handwritten)
        try:
            for clients in args.clients:
                row = {"model": kind, "setting": f"max_batch_size {size}, batch_timeout {timeout}"}
                row |= drive(url, paths, clients, args.requests, expected)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            process.send_signal(signal.SIGTERM if not handwritten else signal.SIGINT)
            process.wait(timeout=60)
    return rows


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--images", type=int, default=64, help="distinct image files")
    parser.add_argument("--requests", type=int, default=96, help="requests per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batching", nargs="+", default=["1:0", "8:0.01"], help="max_batch_size:batch_timeout")
    parser.add_argument("--onnx", action="store_true", help="also serve the exported .onnx file")
    parser.add_argument(
        "--handwritten", action="store_true", help="also the server written by hand from LitServe's guide"
    )
    parser.add_argument("--only-handwritten", action="store_true", help="the hand-written server alone")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    cpuinfo = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    machine = {
        "cpu": cpuinfo[0].split(":")[1].strip() if cpuinfo else platform.processor(),
        "cores": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="serve_benchmark_") as tmp:
        base = Path(tmp)
        # A checkpoint's conversion to ONNX (serve --runtime auto) goes into the temporary folder's cache.
        os.environ["XDG_CACHE_HOME"] = str(base / "cache")
        paths = write_images(base / "images", args.images)
        checkpoint = make_checkpoint(base / "images", base / "runs", args.backbone)
        models = {} if args.only_handwritten else {"checkpoint": checkpoint}
        if args.onnx:
            models["onnx"] = base / "model.onnx"
            main(["export", "--ckpt_path", str(checkpoint), "--output", str(models["onnx"])])
        for kind, model_file in models.items():
            speed, expected = model_path_speed(model_file, paths)
            results.append(
                {"model": kind, "setting": "in-process model path, batch 16", "images_per_s": round(speed, 2)}
            )
            print(json.dumps(results[-1]), flush=True)
            results += serve_runs(kind, model_file, base, paths, expected, args, handwritten=False)
        if args.handwritten or args.only_handwritten:
            speed, expected = model_path_speed(checkpoint, paths)
            results += serve_runs("hand-written", checkpoint, base, paths, expected, args, handwritten=True)
    report = {"machine": machine, "backbone": args.backbone, "image": "300 px JPEG", "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(machine))


if __name__ == "__main__":
    main_benchmark()
