"""`serve`: the real server as a subprocess on a free local port, driven over HTTP as a user
would: parity with `predict` (checkpoint and .onnx), every bad request's status with the next
good one still answered, a batch mixing a corrupt upload with good ones, 16 concurrent
clients, SIGTERM/SIGINT, a worker restart, and the upload page in headless Chromium."""

from __future__ import annotations

import ctypes
import errno
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests import processes
from tests.conftest import COLORS, make_image_folder
from tests.helpers import fit_args, read_csv, run_dirs
from tl_project import serve as serve_module
from tl_project.cli import main

pytestmark = pytest.mark.slow
START_TIMEOUT = 180  # seconds: imports, a spawned worker, the model loaded and warmed up


class Server:
    """`python -m tl_project serve ARGS` in a subprocess, ready when /health answers 200."""

    def __init__(self, log: Path, *args: str, api_key: str | None = None, sigint_ignored: bool = False) -> None:
        self.port = processes.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.headers = {"X-API-Key": api_key} if api_key else {}
        env = os.environ | ({"TL_PROJECT_SERVE__API_KEY": api_key} if api_key else {})
        # A script's background job (`serve ... &`) starts with SIGINT ignored.
        with log.open("wb") as out:
            self.process = processes.start(
                ["serve", *args, "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=log.parent,
                env=env,
                sigint_ignored=sigint_ignored,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"serve did not start:\n{log.read_text()}")
            time.sleep(0.5)
        while "Serving at" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", headers=self.headers, timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def predict(self, data: bytes, name: str = "image.png", field: str = "file") -> requests.Response:
        return requests.post(f"{self.url}/predict", files={field: (name, data)}, headers=self.headers, timeout=60)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small checkpoint, its .onnx export, and predict's predictions.csv for its images."""
    base = tmp_path_factory.mktemp("serve")
    images = make_image_folder(base / "images", COLORS, per_class=6)
    main(fit_args(images, base / "runs", "--trainer.max_epochs", "1"))
    checkpoint = run_dirs(base / "runs")[0] / "checkpoints" / "last.ckpt"
    onnx = base / "model.onnx"
    main(["export", "--ckpt_path", str(checkpoint), "--output", str(onnx)])
    predicted = base / "predicted"
    paths = ("--data.predict_dir", str(images), "--trainer.default_root_dir", str(predicted))
    main(["predict", "--ckpt_path", str(checkpoint), *paths, "--data.num_workers", "0"])
    csv = run_dirs(predicted)[0] / "predictions.csv"
    return {"images": images, "checkpoint": checkpoint, "onnx": onnx, "csv": csv}


@pytest.fixture(scope="module")
def server(trained: dict[str, Path]) -> Iterator[Server]:
    """From the checkpoint, batching 4 requests within 0.2 s, small limits to test against."""
    limits = ("--max_upload_mb", "0.5", "--max_image_pixels", "50000")
    running = Server(
        trained["checkpoint"].parents[3] / "serve.log",
        *("--ckpt_path", str(trained["checkpoint"]), "--max_batch_size", "4", "--batch_timeout", "0.2", *limits),
    )
    yield running
    assert running.stop(signal.SIGTERM) == 0, running.log.read_text()
    assert "Server stopped." in running.log.read_text()


def predicted(trained: dict[str, Path]) -> dict[str, str]:
    """predict's class of every image, by path."""
    return {row["path"]: row["prediction"] for row in read_csv(trained["csv"])}


def png(size: tuple[int, int] = (40, 40), color: tuple[int, int, int] = (200, 50, 50)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def test_answers_are_predicts_from_the_checkpoint(server: Server, trained: dict[str, Path]) -> None:
    rows = read_csv(trained["csv"])
    assert len(rows) == 18
    for row in rows:
        answer = server.predict(Path(row["path"]).read_bytes())
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["prediction"] == row["prediction"]
        assert body["probability"] == pytest.approx(float(row["probability"]), abs=2e-6)
        assert [t["class"] for t in body["top"]] == [row[f"top{k}"] for k in (1, 2, 3)]
    assert server.log.parent.joinpath("client.py").exists() is False  # LitServe's default file: not written


def test_health_info_and_page(server: Server, trained: dict[str, Path]) -> None:
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    info = requests.get(f"{server.url}/info", timeout=5).json()
    assert info["model"]["classes"] == ["cat", "dog", "fish"] and info["model"]["backbone"] == "resnet18"
    assert info["model"]["format"] == "checkpoint" and info["model"]["image_size"] == 32
    assert info["batching"] == {"max_batch_size": 4, "batch_timeout": 0.2}
    assert info["limits"] == {"max_upload_mb": 0.5, "max_image_pixels": 50000}
    page = requests.get(f"{server.url}/", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "litserve running" not in page.text
    assert "http" not in page.text.split("<script>")[1]  # nothing fetched from elsewhere: works offline


def test_bad_requests_get_their_status_and_hurt_nobody(server: Server, trained: dict[str, Path]) -> None:
    good = (trained["images"] / "dog" / "000.png").read_bytes()
    expected_class = predicted(trained)[str(trained["images"] / "dog" / "000.png")]
    url = f"{server.url}/predict"
    bad = {
        "not an image": server.predict(b"just some text, not pixels" * 10),
        "empty": server.predict(b""),
        "truncated": server.predict(good[:200]),
        "missing field": server.predict(good, field="photo"),
        "text field": requests.post(url, files={"file": (None, "hello")}, timeout=30),
        "json body": requests.post(url, json={"file": "x"}, timeout=30),
        "raw image body": requests.post(url, data=good, headers={"Content-Type": "image/png"}, timeout=30),
        "broken multipart": requests.post(
            url, data=b"garbage", headers={"Content-Type": "multipart/form-data; boundary=xyz"}, timeout=30
        ),
        "over the upload limit": server.predict(b"\0" * (600 * 1024)),
        "decompression bomb": server.predict(png((300, 300))),
    }
    expected = {"json body": 415, "raw image body": 415, "over the upload limit": 413, "decompression bomb": 413}
    for what, answer in bad.items():
        assert answer.status_code == expected.get(what, 400), (what, answer.text)
        assert answer.json()["error"], what  # a message naming the problem
    assert "field 'file'" in bad["missing field"].json()["error"]
    assert "50,000" in bad["decompression bomb"].json()["error"]
    after = server.predict(good)
    assert after.status_code == 200 and after.json()["prediction"] == expected_class


def test_a_corrupt_upload_does_not_fail_its_batch(server: Server, trained: dict[str, Path]) -> None:
    files = [trained["images"] / name / "001.png" for name in ("cat", "dog", "fish")]
    good = [f.read_bytes() for f in files]
    uploads = [good[0], good[1][:150], good[1], good[2]]  # sent together: one batch of 4 (0.2 s to fill)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(server.predict, uploads))
    assert [a.status_code for a in answers] == [200, 400, 200, 200]
    expected = predicted(trained)
    assert [answers[i].json()["prediction"] for i in (0, 2, 3)] == [expected[str(f)] for f in files]


def test_many_concurrent_clients_all_succeed(server: Server, trained: dict[str, Path]) -> None:
    files = sorted(trained["images"].rglob("*.png"))
    expected = predicted(trained)
    work = [files[i % len(files)] for i in range(320)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda f: server.predict(f.read_bytes()), work))
    assert all(a.status_code == 200 for a in answers)
    assert all(a.json()["prediction"] == expected[str(f)] for a, f in zip(answers, work, strict=True))


def test_a_dead_worker_is_restarted(server: Server, trained: dict[str, Path]) -> None:
    worker = subprocess.run(
        ["pgrep", "-P", str(server.process.pid), "-f", "spawn_main"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    subprocess.run(["kill", "-9", worker], check=True)
    deadline = time.monotonic() + START_TIMEOUT
    saw_not_ready = False
    while time.monotonic() < deadline:
        status = requests.get(f"{server.url}/health", timeout=5).status_code
        saw_not_ready |= status == 503
        if saw_not_ready and status == 200:
            break
        time.sleep(0.2)
    assert saw_not_ready and server.ready()
    fish = trained["images"] / "fish" / "002.png"
    assert server.predict(fish.read_bytes()).json()["prediction"] == predicted(trained)[str(fish)]


def test_page_in_a_headless_browser(server: Server, trained: dict[str, Path], tmp_path: Path) -> None:
    """Upload an image through the page in Chromium and read the top class it shows."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, "Chromium and its driver are missing: run scripts/system_packages.sh"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path}"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        chrome.get(f"{server.url}/")
        WebDriverWait(chrome, 30).until(lambda c: "resnet18" in c.find_element(By.ID, "model").text)
        fish = trained["images"] / "fish" / "003.png"
        chrome.find_element(By.ID, "file").send_keys(str(fish))
        top = WebDriverWait(chrome, 60).until(lambda c: c.find_elements(By.CSS_SELECTOR, "#bars .top-class"))
        assert top[0].text == predicted(trained)[str(fish)]
        assert len(chrome.find_elements(By.CSS_SELECTOR, "#bars .row")) == 3
    finally:
        chrome.quit()


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie waiting to be reaped has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_a_killed_server_leaves_no_process_and_frees_the_port(trained: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, kill -9) gives the main process no chance to stop its workers:
    they end by themselves, and the port is free again."""
    server = Server(tmp_path / "serve.log", "--ckpt_path", str(trained["checkpoint"]))
    children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 2, children  # the HTTP process and the inference worker at least
    server.process.kill()
    server.process.wait()
    deadline = time.monotonic() + 60
    while any(running(int(pid)) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if running(int(pid))]
    with socket.socket() as s:  # a new server can listen on the port (as serve does: SO_REUSEADDR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))
        s.listen()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_a_process_not_tied_to_the_main_one_says_so(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    class RefusingLibc:
        def prctl(self, *args: object) -> int:
            ctypes.set_errno(errno.EPERM)
            return -1

    monkeypatch.setattr(serve_module.ctypes, "CDLL", lambda *args, **kwargs: RefusingLibc())
    serve_module.end_with(os.getppid())
    err = capfd.readouterr().err
    assert "could not ask Linux to end it with the main process" in err and os.strerror(errno.EPERM) in err
    assert f"kill {os.getpid()}" in err


def test_onnx_file_serves_the_same_answers_behind_a_key_and_stops_on_sigint(trained: dict[str, Path]) -> None:
    log = trained["onnx"].parent / "serve-onnx.log"
    # The key from the environment; SIGINT inherited ignored, as in a script's background job: it still stops.
    running = Server(log, "--ckpt_path", str(trained["onnx"]), api_key="s3cret", sigint_ignored=True)
    try:
        image = (trained["images"] / "cat" / "000.png").read_bytes()
        no_key = requests.post(f"{running.url}/predict", files={"file": ("x.png", image)}, timeout=30)
        assert no_key.status_code in (401, 403)
        assert requests.get(f"{running.url}/info", timeout=5).status_code in (401, 403)
        info = requests.get(f"{running.url}/info", headers=running.headers, timeout=5).json()
        assert info["model"]["format"] == "onnx"
        for row in read_csv(trained["csv"])[::3]:
            body = running.predict(Path(row["path"]).read_bytes()).json()
            assert body["prediction"] == row["prediction"]
            assert body["probability"] == pytest.approx(float(row["probability"]), abs=1e-4)  # export's tolerance
    finally:
        code = running.stop(signal.SIGINT)
    assert code == 0, running.log.read_text()


def test_bad_options_and_files_fail_before_serving(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from tests.helpers import exit_code

    assert exit_code(["serve", "--ckpt_path", str(tmp_path / "missing.ckpt")]) == 2
    assert "does not exist" in capfd.readouterr().err
    assert exit_code(["serve", "--ckpt_path", "x.ckpt", "--host", "example.com"]) == 2
    assert "--host example.com" in capfd.readouterr().err


def test_a_multi_label_model_answers_its_set_and_the_page_shows_it(tmp_path: Path) -> None:
    """A multi-label checkpoint: `{"labels", "probabilities"}` as predict writes them, and the
    page marks the classes of the set."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_multilabel import write_stripes

    root = write_stripes(tmp_path / "data", count=60)
    labels = ("--data.labels", str(root / "labels.csv"), "--data.multi_label", "true")
    main(fit_args(root / "images", tmp_path / "runs", *labels, "--data.batch_size", "16", "--trainer.max_epochs", "3"))
    checkpoint = run_dirs(tmp_path / "runs")[0] / "checkpoints" / "last.ckpt"
    main(["predict", "--ckpt_path", str(checkpoint), "--data.predict_dir", str(root / "images"),
          "--output", str(tmp_path / "predicted.csv"), "--data.num_workers", "0"])  # fmt: skip
    rows = {Path(row["path"]).name: row for row in read_csv(tmp_path / "predicted.csv")}
    server = Server(tmp_path / "serve.log", "--ckpt_path", str(checkpoint))
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'ud'}"):
        options.add_argument(flag)
    try:
        image = root / "images" / "005.png"
        answer = server.predict(image.read_bytes()).json()
        expected = rows[image.name]
        assert answer["labels"] == expected["labels"].split() and answer["labels"]
        assert answer["probabilities"] == pytest.approx(
            {c: float(expected[c]) for c in ("blue", "green", "red")}, abs=1e-4
        )
        chrome = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
        try:
            chrome.get(f"{server.url}/")
            WebDriverWait(chrome, 30).until(lambda c: "resnet18" in c.find_element(By.ID, "model").text)
            chrome.find_element(By.ID, "file").send_keys(str(image))
            WebDriverWait(chrome, 60).until(lambda c: c.find_elements(By.CSS_SELECTOR, "#bars .row"))
            chosen = [e.text for e in chrome.find_elements(By.CSS_SELECTOR, "#bars .top-class")]
            assert sorted(chosen) == sorted(answer["labels"])
            assert len(chrome.find_elements(By.CSS_SELECTOR, "#bars .row")) == 3
        finally:
            chrome.quit()
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.log.read_text()
