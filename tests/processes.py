"""Processes for the tests that need a process of their own (a kill, a signal, DDP, a server),
without the 5-6 s of imports (torch, torchvision, Lightning) of each new interpreter.

`start(args)` runs `python -m tl_project ARGS` and `start_call(function, *args)` runs
`function(*args)`, each in a new process forked from a *command server*: a process of
each pytest worker that has imported tl_project's commands once and never runs torch
itself (a process forked after OpenMP's threads have run can hang in them). The child
becomes what a new interpreter would be: its own pid (and process group), the caller's
working directory, environment, stdout and stderr (stdin: /dev/null), default signal handlers, `sys.argv` and `__main__`'s
module spec of `python -m tl_project` (so Lightning's DDP launcher and multiprocessing's
spawn start their processes as for a user), warnings filters from `PYTHONWARNINGS`, and an
interpreter's exit (atexit, non-daemon threads, the exit status; death by an uncaught
signal). What it skips: the imports, and reading the environment at import time.

The handles have the methods of `subprocess.Popen` the tests use. With
`TL_PROJECT_TEST_INTERPRETERS=1` they are real interpreters (`subprocess.Popen` of
`python -m tl_project ARGS`), to compare.

`python -m tests.processes SOCKET` is the server: it answers on a Unix socket, one
connection per process: the request (JSON, with the caller's three standard streams'
file descriptors attached), then two answers: the pid, and at its end the exit status.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import importlib
import importlib.util
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Union

REPO = Path(__file__).resolve().parent.parent
INTERPRETERS = os.environ.get("TL_PROJECT_TEST_INTERPRETERS") == "1"
MESSAGE = 1 << 20  # the largest request: an environment of a few kB, with room


class Forked:
    """A process forked by the command server, with `subprocess.Popen`'s `pid`, `returncode`,
    `poll`, `wait`, `send_signal`, `terminate` and `kill`."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.pid: int = json.loads(connection.recv(MESSAGE))["pid"]
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.connection.settimeout(timeout)
            try:
                answer = self.connection.recv(MESSAGE)
            except (TimeoutError, BlockingIOError):  # timeout 0: BlockingIOError
                raise subprocess.TimeoutExpired(f"process {self.pid}", timeout or 0) from None
            if not answer:
                raise RuntimeError(f"the command server ended before process {self.pid}")
            self.returncode = int(json.loads(answer)["returncode"])
            self.connection.close()
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


Process = Union[Forked, "subprocess.Popen[bytes]"]
Stream = IO[Any] | int | None  # a file, subprocess.DEVNULL, subprocess.STDOUT (stderr only), None: inherit


class CommandServer:
    """The server process of this pytest worker, started on first use."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="tl_project-commands-")
        self.address = str(Path(self.folder) / "socket")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.processes", self.address], cwd=REPO, stdout=subprocess.PIPE
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the command server did not start: exit status {self.process.wait()}")

    def start(self, request: dict[str, Any], streams: Sequence[int]) -> Forked:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        connection.connect(self.address)
        socket.send_fds(connection, [json.dumps(request).encode()], list(streams))
        return Forked(connection)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        for path in Path(self.folder).iterdir():
            path.unlink()
        os.rmdir(self.folder)


_server: CommandServer | None = None


def _command_server() -> CommandServer:
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = CommandServer()
        atexit.register(_server.stop)
    return _server


def _descriptors(stdout: Stream, stderr: Stream, devnull: int) -> list[int]:
    """The child's stdin (/dev/null), stdout and stderr, as file descriptors of this process."""

    def descriptor(stream: Stream, inherited: int) -> int:
        if stream is None:
            return inherited
        if stream == subprocess.DEVNULL:
            return devnull
        assert not isinstance(stream, int), f"unsupported stream {stream}"
        return stream.fileno()

    out = descriptor(stdout, 1)
    return [devnull, out, out if stderr == subprocess.STDOUT else descriptor(stderr, 2)]


def start(
    args: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    stdout: Stream = None,
    stderr: Stream = None,
    sigint_ignored: bool = False,
) -> Process:
    """`python -m tl_project ARGS` in a new process. `sigint_ignored`: started with SIGINT
    ignored, as a shell script's background job is."""
    return _start({"args": list(args)}, cwd, env, stdout, stderr, sigint_ignored)


def start_call(function: Callable[..., Any], *args: Any, cwd: Path | str | None = None,
               env: dict[str, str] | None = None, stdout: Stream = None, stderr: Stream = None) -> Process:  # fmt: skip
    """`function(*args)` (a module-level function; JSON arguments) in a new process."""
    call = {"call": f"{function.__module__}:{function.__qualname__}", "call_args": list(args)}
    return _start(call, cwd, env, stdout, stderr, False)


def _start(request: dict[str, Any], cwd: Path | str | None, env: dict[str, str] | None, stdout: Stream,
           stderr: Stream, sigint_ignored: bool) -> Process:  # fmt: skip
    cwd, env = str(cwd or os.getcwd()), dict(os.environ if env is None else env)
    if INTERPRETERS:
        if "call" in request:
            module, name = request["call"].split(":")
            code = f"import sys, json; from {module} import {name}; {name}(*json.loads(sys.argv[1]))"
            command = [sys.executable, "-c", code, json.dumps(request["call_args"])]
        else:
            command = [sys.executable, "-m", "tl_project", *request["args"]]
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        env.setdefault("PYTHONPATH", str(REPO))
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, preexec_fn=ignore)
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        streams = _descriptors(stdout, stderr, devnull)
        return _command_server().start({**request, "cwd": cwd, "env": env, "sigint_ignored": sigint_ignored}, streams)
    finally:
        os.close(devnull)


def run(
    args: Sequence[str], *, cwd: Path | str | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m tl_project ARGS` to its end, as `subprocess.run(..., capture_output=True, text=True)`."""
    return finish([functools.partial(start, args, cwd=cwd, env=env)], list(args), timeout)


def run_ddp(
    args: Sequence[str], *, cwd: Path | str | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m tl_project ARGS` (with --trainer.devices N --trainer.strategy ddp) started on N
    processes at once, as torchrun or a cluster's scheduler starts them: each with LOCAL_RANK,
    NODE_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, so Lightning starts none itself. To its
    end: the first non-zero exit status (the others are then killed), every rank's output."""
    devices = int(args[list(args).index("--trainer.devices") + 1])
    base = {**(os.environ if env is None else env), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    base |= {"NODE_RANK": "0", "WORLD_SIZE": str(devices)}
    starters = [
        functools.partial(start, args, cwd=cwd, env={**base, "LOCAL_RANK": str(rank)}) for rank in range(devices)
    ]
    return finish(starters, list(args), timeout)


def run_call(function: Callable[..., Any], *args: Any, cwd: Path | str | None = None,
             env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`function(*args)` to its end, as `run`."""
    starter = functools.partial(start_call, function, *args, cwd=cwd, env=env)
    return finish([starter], [function.__qualname__, *map(str, args)], timeout)


def finish(
    starters: Sequence[Callable[..., Process]], command: list[str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Start a process with each starter (called with `stdout=` and `stderr=` temporary files)
    and wait for all of them: the first non-zero exit status ends the others. Their outputs,
    one after the other, as `subprocess.run(..., capture_output=True, text=True)` gives one's."""
    with contextlib.ExitStack() as files:
        outputs = [[files.enter_context(tempfile.TemporaryFile()) for _ in "oe"] for _ in starters]
        started = [starter(stdout=out, stderr=err) for starter, (out, err) in zip(starters, outputs, strict=True)]
        deadline = time.monotonic() + timeout
        try:
            while (codes := [process.poll() for process in started]).count(None) and not any(codes):
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(command, timeout)
                time.sleep(0.05)
        finally:
            for process in started:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        text = []
        for index in (0, 1):  # stdout, stderr
            for streams in outputs:
                streams[index].seek(0)
            text.append("".join(streams[index].read().decode(errors="replace") for streams in outputs))
    return subprocess.CompletedProcess(command, next((code for code in codes if code), 0), text[0], text[1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the server ---------------------------------------------------------------------------


def serve(address: str) -> dict[str, Any]:
    """Fork a process for each request, forever; returns only in a forked child: its request."""
    import tl_project.cli

    for command in {command.module for command in tl_project.cli.COMMANDS.values()}:
        importlib.import_module(f"tl_project.commands.{command}")
    importlib.import_module("tests.helpers")

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    running: dict[int, tuple[int, socket.socket]] = {}  # by pidfd: the pid and its caller's connection

    def stop(*_: Any) -> None:
        """Nothing a test started outlives its pytest worker: each process's group is killed."""
        for pid, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                connection, _ = listener.accept()
                message, streams, _, _ = socket.recv_fds(connection, MESSAGE, 3)
                sys.stdout.flush(), sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    os.setpgid(0, 0)  # a group of its own: its processes (DDP's, a server's) go with it
                    for pidfd, (_, other) in running.items():
                        os.close(pidfd), other.close()
                    selector.close(), listener.close(), connection.close()
                    request: dict[str, Any] = json.loads(message)
                    become(request, streams)
                    return request
                for stream in streams:
                    os.close(stream)
                connection.send(json.dumps({"pid": pid}).encode())
                pidfd = os.pidfd_open(pid)
                selector.register(pidfd, selectors.EVENT_READ)
                running[pidfd] = (pid, connection)
            else:
                pidfd = int(key.fd)
                selector.unregister(pidfd)
                pid, connection = running.pop(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):  # unless the caller is gone
                    connection.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
                connection.close()


def become(request: dict[str, Any], streams: list[int]) -> None:
    """Make this forked child what `python -m tl_project ARGS` would start."""
    for target, stream in enumerate(streams):
        os.dup2(stream, target)
    for stream in set(streams) - {0, 1, 2}:
        os.close(stream)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN if request["sigint_ignored"] else signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if options := os.environ.get("PYTHONWARNINGS"):
        warnings._processoptions(options.split(","))  # type: ignore[attr-defined]  # as the interpreter does
    main = importlib.util.find_spec("tl_project.__main__")
    assert main is not None and main.origin is not None
    sys.modules["__main__"].__spec__ = main  # how Lightning and multiprocessing start more processes
    sys.argv = [main.origin, *request.get("args", [])]


def run_request(request: dict[str, Any]) -> None:
    """What `python -m tl_project` runs (`console`: `main` of `sys.argv`, then a quick exit), or the call."""
    from tl_project.cli import console

    if "call" not in request:
        return console()
    module, name = request["call"].split(":")
    try:
        getattr(importlib.import_module(module), name)(*request["call_args"])
    finally:
        gc.freeze()  # as `console`


if __name__ == "__main__":
    from tl_project.serve import end_with

    end_with(os.getppid())  # the server ends with its pytest worker
    run_request(serve(sys.argv[1]))
