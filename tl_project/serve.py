"""`serve`: a checkpoint or an exported .onnx file behind HTTP, on LitServe.

    python -m tl_project serve --ckpt_path runs/version_0/checkpoints/best.ckpt
    curl -F file=@photo.jpg http://127.0.0.1:8000/predict

- `POST /predict`: one image as a multipart upload in the field `file`; the answer is what
  `predict` writes for the same file (same decoding, preprocessing, precision and `model.tta`,
  calibrated probabilities): `{"prediction", "probability", "answered", "top": [{"class",
  "probability"}, ...]}` (top-5 or fewer); `answered` is false when the probability is under
  the answer threshold (the checkpoint's, or `--min_probability`). With the form field
  `explain=true` (a checkpoint only) the answer adds `"explanation"`: a PNG data URL of the
  class-activation map of the top class over the image as the model saw it (`explain.py`).
- `GET /health`: 200 once every inference worker has loaded the model, 503 before.
- `GET /info`: the model (backbone, classes, preprocessing, file) and the batching settings.
- `GET /`: an upload page (`serve_page.html`, plain HTML and JS, works offline).

Requests are batched dynamically (LitServe's `max_batch_size` / `batch_timeout`). Each
request is checked on its own: the upload gate (an ASGI middleware, before the body is
read) answers 415 for a body that is not a multipart upload and 413 for one over the size
limit; in the worker, an upload that is missing, empty, not an image, truncated or over the
pixel limit gets its own 400 or 413 while the others of its batch are answered as usual.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import io
import os
import signal
import sys
import threading
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.types import ASGIApp, Receive, Scope, Send

from tl_project.checkpoints import find_checkpoint
from tl_project.classifier import Classifier
from tl_project.data.images import decode_image_bytes
from tl_project.errors import UserError
from tl_project.explain import ClassActivationMaps, overlay, png_bytes
from tl_project.predictions import answer_threshold_in_force
from tl_project.runtime import say, usable_cores, warn
from tl_project.transforms import eval_transform, normalize

TOP_K = 5
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
HOW_TO_SEND = "send the image as a multipart upload in the field 'file' (curl -F file=@photo.jpg URL/predict)"


@dataclass(frozen=True)
class Rejected:
    """A request answered with an error of its own (`status`, a 4xx) instead of a prediction."""

    status: int
    message: str

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status)


@dataclass(frozen=True)
class Upload:
    """One request's image bytes, and whether it asks for the class-activation map."""

    data: bytes
    explain: bool


@dataclass(frozen=True)
class Answer:
    """The model's answer to one image: the top classes with their probabilities (multi-label:
    every class's, in class order) and the map's PNG data URL when asked for."""

    top: list[tuple[int, float]]
    explanation: str | None = None


def upload_bytes(request: Any) -> bytes | Rejected:
    """The bytes of the upload in the field `file`, or why there is none."""
    if not isinstance(request, Mapping) or "file" not in request:
        return Rejected(400, f"No field 'file' in the request: {HOW_TO_SEND}.")
    upload = request["file"]
    if isinstance(upload, str) or not hasattr(upload, "file"):
        return Rejected(400, f"The field 'file' holds text, not a file: {HOW_TO_SEND}.")
    upload.file.seek(0)
    data = upload.file.read()
    return data if data else Rejected(400, "The uploaded file is empty: send an image file (JPEG, PNG, ...).")


def header_problem(data: bytes, max_pixels: int) -> Rejected | None:
    """What the image header alone refuses: not an image, or more pixels than the limit
    (a decompression bomb is refused before its pixels are decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        return Rejected(413, f"The image is too large to decode: {error}")
    except Exception:
        return Rejected(400, "The uploaded file is not an image this server can read (JPEG, PNG, WebP, ...).")
    if width * height > max_pixels:
        return Rejected(
            413, f"The image has {width} x {height} = {width * height:,} pixels, over the limit of {max_pixels:,}."
        )
    return None


PR_SET_PDEATHSIG = 1  # prctl(2)


def end_with(parent: int) -> None:
    """On Linux, this process gets SIGTERM when `parent`, the process that started it, ends,
    even by SIGKILL (which leaves no chance to stop the workers): no inference worker or HTTP
    process of a server outlives its main process, holding the port and memory."""
    if not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        warn(
            f"Process {os.getpid()} of the server could not ask Linux to end it with the main process "
            f"(prctl: {os.strerror(ctypes.get_errno())}): if the main process is killed with SIGKILL, "
            f"end this one too (kill {os.getpid()})."
        )
        return
    if os.getppid() != parent:  # it ended before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


class ClassifierAPI(ls.LitAPI):
    """The model behind `POST /predict`; runs in LitServe's inference workers."""

    def __init__(
        self,
        model_path: str,
        max_image_pixels: int | None,
        min_probability: float | None = None,
        runtime: str = "auto",
        **batching: Any,
    ) -> None:
        super().__init__(api_path="/predict", **batching)
        self.model_path, self.max_image_pixels, self.runtime = model_path, max_image_pixels, runtime
        self.min_probability = min_probability
        self.server_process = os.getpid()  # built in the main process; setup runs in a worker

    def setup(self, device: str) -> None:
        end_with(self.server_process)
        torch.set_num_threads(usable_cores())
        self.classifier = Classifier(self.model_path, device, self.runtime)
        self.classifier.min_probability = answer_threshold_in_force(
            self.min_probability, self.classifier.min_probability, self.classifier.multi_label
        )
        self.maps: Any = None  # ClassActivationMaps, made at the first request that asks
        self.max_pixels = self.max_image_pixels or self.classifier.max_pixels
        self.transform = eval_transform(self.classifier.image_size, self.classifier.preprocessing)
        self.pool = ThreadPoolExecutor(max(1, usable_cores()))  # decoding in parallel (the decoders release the GIL)
        size = self.classifier.image_size
        self.classifier.probabilities(torch.zeros(1, 3, size, size, dtype=torch.uint8))  # warm up before ready

    def decode_request(self, request):  # LitServe reads the annotation: none (a form or a JSON body)
        """The upload, or why it is refused; the cheap checks of one request."""
        data = upload_bytes(request)
        if isinstance(data, Rejected):
            return data
        explain = str(request.get("explain", "false")).lower() in ("true", "1", "yes")
        if explain and self.classifier.model is None:
            return Rejected(
                400, "explain=true needs the network's gradients: serve the checkpoint, not an .onnx file, for maps."
            )
        return header_problem(data, self.max_pixels) or Upload(data, explain)

    def _image(self, item: Upload | Rejected) -> torch.Tensor | Rejected:
        if isinstance(item, Rejected):
            return item
        try:
            encoded = torch.frombuffer(bytearray(item.data), dtype=torch.uint8)
            return self.transform(decode_image_bytes(encoded, "upload"))
        except UserError:
            return Rejected(400, "The uploaded image could not be decoded: it is truncated or corrupt.")

    def _explanations(self, images: list[torch.Tensor], classes: list[int]) -> list[str]:
        """The maps of `classes` over `images` (uint8, as the model saw them), as PNG data URLs."""
        assert self.classifier.model is not None
        if self.maps is None:
            self.maps = ClassActivationMaps(self.classifier.model, self.classifier.image_size)
        batch = normalize(torch.stack(images).to(self.classifier.device), self.classifier.preprocessing)
        maps = self.maps(batch, torch.tensor(classes))
        return [
            "data:image/png;base64," + base64.b64encode(png_bytes(overlay(image, cam))).decode()
            for image, cam in zip(images, maps, strict=True)
        ]

    def predict(self, x: Any) -> Any:
        """Every request of the batch answered on its own: the good images in one forward pass."""
        items = x if isinstance(x, list) else [x]
        images = list(self.pool.map(self._image, items))
        good = [i for i, image in enumerate(images) if isinstance(image, torch.Tensor)]
        outputs: list[Any] = list(images)
        if good:
            probabilities = self.classifier.probabilities(torch.stack([images[i] for i in good]))  # type: ignore[misc]
            if self.classifier.multi_label:  # every class's probability; encode_response takes the set
                tops = [list(enumerate(row)) for row in probabilities.tolist()]
            else:
                top = probabilities.topk(min(TOP_K, len(self.classifier.classes)), dim=1)
                tops = [
                    list(zip(c, p, strict=True)) for c, p in zip(top.indices.tolist(), top.values.tolist(), strict=True)
                ]
            asking = [row for row, i in enumerate(good) if items[i].explain]
            maps: dict[int, str] = {}
            if asking:  # the map of the most probable class
                classes = [max(tops[row], key=lambda entry: entry[1])[0] for row in asking]
                pictures = self._explanations([images[good[row]] for row in asking], classes)  # type: ignore[misc]
                maps = dict(zip(asking, pictures, strict=True))
            for row, i in enumerate(good):
                outputs[i] = Answer(tops[row], maps.get(row))
        return outputs if isinstance(x, list) else outputs[0]

    def encode_response(self, output):  # LitServe reads the annotation: none (a dict or a JSONResponse)
        if isinstance(output, Rejected):
            return output.response()
        explanation = {"explanation": output.explanation} if output.explanation else {}
        names = self.classifier.classes
        if self.classifier.multi_label:
            probabilities = [p for _, p in output.top]
            thresholds = self.classifier.thresholds.tolist()
            chosen = [n for n, p, t in zip(names, probabilities, thresholds, strict=True) if p >= t]
            return {"labels": chosen, "probabilities": dict(zip(names, probabilities, strict=True)), **explanation}
        top = [{"class": names[c], "probability": p} for c, p in output.top]
        answered = top[0]["probability"] >= self.classifier.min_probability
        return {
            "prediction": top[0]["class"],
            "probability": top[0]["probability"],
            "answered": answered,
            "top": top,
            **explanation,
        }


class UploadGate:
    """ASGI middleware of `POST /predict`: 415 for a body that is not a multipart upload, 413 for
    one over `max_mb` (from Content-Length before anything is read, else while it streams), 400
    for one whose multipart encoding cannot be parsed."""

    def __init__(self, app: ASGIApp, max_mb: float) -> None:
        self.app, self.max_mb, self.max_bytes = app, max_mb, int(max_mb * 2**20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"").decode("latin-1")
        length = headers.get(b"content-length", b"").decode("latin-1")
        too_large = Rejected(413, f"The upload is over the limit of {self.max_mb:g} MB (--max_upload_mb).")
        if not kind.startswith("multipart/form-data"):
            await Rejected(415, f"The body is {kind or 'without a type'}: {HOW_TO_SEND}.").response()(
                scope, receive, send
            )
            return
        if length.isdigit() and int(length) > self.max_bytes:
            await too_large.response()(scope, receive, send)
            return
        body = bytearray()
        while True:  # read here, within the limit, so that a malformed body is a 400, not a 500
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await too_large.response()(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        try:
            await Request(scope, replay(bytes(body))).form()
        except Exception as error:
            await Rejected(400, f"The multipart body cannot be parsed ({error}): {HOW_TO_SEND}.").response()(
                scope, receive, send
            )
            return
        await self.app(scope, replay(bytes(body)), send)


def replay(body: bytes) -> Receive:
    """An ASGI `receive` that gives `body` once, then waits for the client to disconnect."""
    sent = False

    async def receive() -> Any:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def replace_route(app: Any, path: str, endpoint: Any, response_class: Any = Response) -> None:
    """`GET path` answered by `endpoint` instead of LitServe's own."""
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != path]
    app.add_api_route(path, endpoint, methods=["GET"], response_class=response_class)


def announce_when_ready(url: str, api_key: str | None, stop: threading.Event) -> None:
    """Say the URL once /health answers 200 (every worker has loaded the model)."""
    request = urllib.request.Request(f"{url}/health", headers={"X-API-Key": api_key} if api_key else {})
    while not stop.wait(0.2):
        try:
            with urllib.request.urlopen(request, timeout=2) as answer:
                if answer.status == 200:
                    say(f"Serving at {url} (upload page: {url}/, API: POST {url}/predict, Ctrl+C to stop)")
                    return
        except OSError:
            continue


def serve(
    ckpt_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    batch_timeout: float = 0.01,
    workers_per_device: int = 1,
    accelerator: str = "auto",
    devices: int | str = "auto",
    max_upload_mb: float = 20.0,
    max_image_pixels: int | None = None,
    api_key: str | None = None,
    timeout: float = 30.0,
    min_probability: float | None = None,
    runtime: str = "auto",
) -> None:
    """Serve a checkpoint or an exported .onnx file over HTTP: POST /predict, GET /health, /info, and an upload page at /.

    Args:
        ckpt_path: A tl_project checkpoint (.ckpt; last or best: the newest run's), or an .onnx file written by export.
        host: The address to listen on: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface: set --api_key).
        port: The port to listen on (1024-65535).
        max_batch_size: Requests batched into one forward pass at most; 1 turns batching off.
        batch_timeout: Seconds a batch waits to fill up before it runs.
        workers_per_device: Inference worker processes per device, each with its own copy of the model.
        accelerator: cpu, cuda or auto.
        devices: Devices to use (a number), or auto.
        max_upload_mb: Uploads over this size are refused with 413 before they are read.
        max_image_pixels: Images with more pixels are refused with 413 from their header; null: the checkpoint's data.max_image_pixels.
        api_key: If set, every request must carry it in the header X-API-Key (the page asks for it).
        timeout: Seconds a request may wait for its answer before a 504.
        min_probability: The lowest top-class probability that counts as an answer ("answered": false below it); null: the checkpoint's (fit --model.target_accuracy), else 0.
        runtime: What runs a checkpoint: auto (ONNX Runtime on a CPU, converted once into the cache and checked against PyTorch; PyTorch on a GPU or where that fails), torch, or onnxruntime.
    """
    if host not in HOSTS:
        raise UserError(f"--host {host}: choose one of {', '.join(HOSTS)}.")
    if not 1024 <= port <= 65535:
        raise UserError(f"--port {port}: choose a port from 1024 to 65535.")
    if max_batch_size < 1 or batch_timeout < 0 or workers_per_device < 1 or max_upload_mb <= 0:
        raise UserError(
            "--max_batch_size and --workers_per_device must be 1 or more, --batch_timeout 0 or more, "
            "--max_upload_mb above 0."
        )
    path = find_checkpoint(ckpt_path, "runs")
    # A bad file fails here, with its reason, not in a worker; a checkpoint is converted here, once.
    described = Classifier(path, "cpu", runtime).describe()
    if max_image_pixels:
        described["max_image_pixels"] = max_image_pixels
    described["min_probability"] = answer_threshold_in_force(
        min_probability, described["min_probability"], described["multi_label"]
    )
    api = ClassifierAPI(
        path, max_image_pixels, min_probability, runtime, max_batch_size=max_batch_size, batch_timeout=batch_timeout
    )
    ls.server.LIT_SERVER_API_KEY = api_key  # LitServe's key check reads it (it is read from the environment)
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers_per_device,
        timeout=timeout,
        middlewares=[(UploadGate, {"max_mb": max_upload_mb})],
        restart_workers=True,
    )
    batching = {"max_batch_size": max_batch_size, "batch_timeout": batch_timeout}
    limits = {"max_upload_mb": max_upload_mb, "max_image_pixels": described["max_image_pixels"]}
    workers = {"accelerator": accelerator, "devices": devices, "workers_per_device": workers_per_device}
    info = {"model": described, "batching": batching, "limits": limits, "workers": workers}
    page = resources.files("tl_project").joinpath("serve_page.html").read_text()

    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    async def info_endpoint(request: Request) -> JSONResponse:
        if api_key and request.headers.get("x-api-key") != api_key:
            raise HTTPException(401, "Pass the server's API key in the header X-API-Key.")
        return JSONResponse(info)

    replace_route(server.app, "/", index, HTMLResponse)
    replace_route(server.app, "/info", info_endpoint, JSONResponse)
    url = f"http://{'127.0.0.1' if host != '::' else '[::1]'}:{port}"
    stop = threading.Event()
    threading.Thread(target=announce_when_ready, args=(url, api_key, stop), daemon=True).start()
    main_process = os.getpid()
    # The HTTP processes LitServe forks end with this one too (the inference workers: setup).
    os.register_at_fork(after_in_child=functools.partial(end_with, main_process))

    def on_signal(signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM and os.getpid() != main_process:  # a forked worker: end as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt  # LitServe's graceful shutdown: workers stopped, the port freed

    # SIGINT too, explicitly: a process started in the background by a script inherits it ignored.
    previous = {number: signal.signal(number, on_signal) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(host=host, port=port, generate_client_file=False, log_level="warning")
    finally:
        stop.set()
        for number, handler in previous.items():
            signal.signal(number, handler)
    say("Server stopped.")
