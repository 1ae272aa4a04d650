"""A real Orthanc PACS on loopback for tests: the DICOMweb counterpart the service talks to in hospitals.

Why a real one: the service's STOW-RS endpoint and its PACS watcher must accept what Orthanc actually sends
(chunked multipart/related bodies, its JSON answers, its stable-series events), and a mock would only repeat
our own reading of the standard. Debian's ``orthanc`` and ``orthanc-dicomweb`` packages are enough; without
them ``orthanc_available()`` says why and the tests that need Orthanc skip.

Each ``running_orthanc`` gets its own configuration, storage, index and log under the test's ``tmp_path``
and its own free loopback ports, so it never touches (nor collides with) a system Orthanc on 8042/4242.
Orthanc starts in about 0.15 s but takes 1-2.5 s to stop (its embedded HTTP server winds down slowly), so
a test that needs several Orthanc conversations should have them with one instance.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

T = TypeVar("T")

# Debian installs the daemon in /usr/sbin, which is not on a normal user's PATH.
ORTHANC_BINARY: str | None = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")

_PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),  # Debian/Ubuntu orthanc-dicomweb
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
    Path("/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so"),
)
DICOMWEB_PLUGIN: Path | None = next((path for path in _PLUGIN_CANDIDATES if path.is_file()), None)

START_TIMEOUT_S = 30.0  # a loaded 2-core CI runner; an idle machine needs ~0.15 s
STOP_GRACE_S = 10.0  # SIGTERM first (Orthanc closes its index; ~1-2.5 s: its HTTP server stops slowly)

# DICOM JSON (PS3.18 F.2) tags that QIDO-RS answers with, and that instances_of_study reports.
_SOP_CLASS_UID = "00080016"
_SOP_INSTANCE_UID = "00080018"
_STUDY_INSTANCE_UID = "0020000D"
_SERIES_INSTANCE_UID = "0020000E"


def orthanc_available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else the reason (for ``pytest.skip``)."""
    if ORTHANC_BINARY is None:
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb)"
    if DICOMWEB_PLUGIN is None:
        return "the Orthanc DICOMweb plugin is not installed (Debian: apt-get install orthanc-dicomweb)"
    return None


class OrthancError(RuntimeError):
    """Orthanc answered a REST call with an error status; ``body`` carries its explanation (HttpDescribeErrors)."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"Orthanc {method} {path} -> {status}: {body}")
        self.status = status
        self.body = body


def free_port() -> int:
    """A loopback port the kernel just handed out (a tiny race with other processes, acceptable in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc: its REST root, its DICOMweb root, and a few calls the tests need."""

    url: str
    dicomweb_url: str
    storage: Path
    log: Path
    http: httpx.Client = field(repr=False)
    dicom_port: int | None = None

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_error:
            raise OrthancError(response.request.method, response.request.url.path, response.status_code, response.text)
        return response

    def get(self, path: str, **params: Any) -> Any:
        """GET a REST path (``/system``, ``/changes``...) and decode its JSON answer."""
        return self._check(self.http.get(f"{self.url}{path}", params=params or None)).json()

    def post(self, path: str, body: Any) -> Any:
        """POST JSON to a REST path and decode Orthanc's JSON answer."""
        return self._check(self.http.post(f"{self.url}{path}", json=body)).json()

    def upload(self, data: bytes) -> dict[str, Any]:
        """Store one DICOM file (POST /instances); Orthanc answers ID, ParentPatient/Study/Series, Status."""
        response = self.http.post(f"{self.url}/instances", content=data, headers={"Content-Type": "application/dicom"})
        return dict(self._check(response).json())

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every stored instance of a study with its UIDs and Orthanc IDs, sorted by SOPInstanceUID.

        Two queries joined on SOPInstanceUID: QIDO-RS knows SOPClassUID (Orthanc 1.10 keeps it out of its
        main DICOM tags) and /tools/find knows the Orthanc IDs (QIDO-RS does not report them).
        """
        response = self.http.get(
            f"{self.dicomweb_url}/studies/{study_instance_uid}/instances", headers={"Accept": "application/dicom+json"}
        )
        if response.status_code == 204:  # some QIDO servers answer "no content" for no match
            return []
        qido = {_value(item, _SOP_INSTANCE_UID): item for item in self._check(response).json()}
        found = self.post(
            "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True}
        )
        instances = []
        for item in found:
            sop_instance_uid = item["MainDicomTags"]["SOPInstanceUID"]
            dicom_json = qido.get(sop_instance_uid, {})
            instances.append(
                {
                    "ID": item["ID"],
                    "ParentSeries": item["ParentSeries"],
                    "SOPInstanceUID": sop_instance_uid,
                    "SOPClassUID": _value(dicom_json, _SOP_CLASS_UID),
                    "SeriesInstanceUID": _value(dicom_json, _SERIES_INSTANCE_UID),
                    "StudyInstanceUID": _value(dicom_json, _STUDY_INSTANCE_UID) or study_instance_uid,
                }
            )
        return sorted(instances, key=lambda instance: instance["SOPInstanceUID"])

    def download(self, orthanc_instance_id: str) -> bytes:
        """The stored DICOM file, byte for byte as uploaded (GET /instances/{id}/file)."""
        return self._check(self.http.get(f"{self.url}/instances/{orthanc_instance_id}/file")).content

    def stow_to(self, server_name: str, resources: list[str], **options: Any) -> dict[str, Any]:
        """Have Orthanc push patients/studies/series/instances (Orthanc IDs) to a DicomWeb server with STOW-RS.

        Synchronous: returns once the remote has answered, with the job's content (DICOMweb plugin 1.7:
        ``{"InstancesCount": "3", "NetworkSizeMB": "0"}``). Orthanc sends every instance of every resource in
        one POST to ``{server url}studies`` and does not retry: a refusal fails the job, and Orthanc answers
        a bare 500 "Error encountered within the plugin engine". The reason is only in Orthanc's log, so the
        OrthancError raised here carries the log's error lines from this call. ``options`` go into the
        request body as they are (``HttpHeaders``, ``Priority``...).
        """
        body = {"Resources": resources, "Synchronous": True, **options}
        log_offset = self.log.stat().st_size if self.log.exists() else 0
        try:
            return dict(self.post(f"/dicom-web/servers/{server_name}/stow", body))
        except OrthancError as error:
            raise OrthancError(
                "POST",
                f"/dicom-web/servers/{server_name}/stow",
                error.status,
                f"{error.body}\n{self.log_errors(log_offset)}",
            ) from None

    def log_errors(self, offset: int = 0) -> str:
        """The error lines (``E...``) Orthanc logged after byte ``offset`` of its log file."""
        with self.log.open("rb") as file:
            file.seek(offset)
            lines = file.read().decode(errors="replace").splitlines()
        return "\n".join(line for line in lines if line.startswith("E"))

    def changes(self, since: int = 0, limit: int = 100) -> dict[str, Any]:
        """Orthanc's change log (NewInstance, StableSeries, StableStudy...) after sequence number ``since``."""
        return dict(self.get("/changes", since=since, limit=limit))

    def wait_for(self, predicate: Callable[[], T], timeout_s: float = 60, interval_s: float = 0.1) -> T:
        """Poll ``predicate`` until it returns something truthy and return that (e.g. a StableSeries change)."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout_s} s (Orthanc log: {self.log})")
            time.sleep(interval_s)


def _value(dicom_json: Mapping[str, Any], tag: str) -> Any:
    """The first value of a DICOM JSON attribute, None when absent or empty."""
    values = dicom_json.get(tag, {}).get("Value") or [None]
    return values[0]


def orthanc_config(
    tmp_path: Path,
    http_port: int,
    dicom_port: int | None,
    dicomweb_servers: Mapping[str, str | Mapping[str, Any]],
) -> dict[str, Any]:
    """The JSON configuration: loopback only, no auth, DICOMweb at /dicom-web/, and light on a 2-core machine."""
    storage = tmp_path / "storage"
    return {
        "Name": "c2p-test-orthanc",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "SyncStorageArea": False,  # no fsync per instance: tests throw the storage away
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # only 127.0.0.1 may call, which is what makes no auth acceptable
        "AuthenticationEnabled": False,
        "HttpThreadsCount": 4,
        "HttpCompressionEnabled": False,
        "HttpDescribeErrors": True,
        "HttpTimeout": 30,  # outgoing requests (STOW-RS to our service): fail a test rather than hang it
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "MetricsEnabled": False,
        "DicomServerEnabled": dicom_port is not None,
        "DicomPort": dicom_port if dicom_port is not None else 4242,
        "DicomAet": "ORTHANC",
        "StableAge": 2,  # seconds without new instances before StableSeries/StableStudy (default 60)
        "LuaScripts": [],
        "ExecuteLuaEnabled": False,
        "ConcurrentJobs": 2,
        "SaveJobs": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": False,
            "Servers": {
                name: {"Url": server} if isinstance(server, str) else dict(server)
                for name, server in dicomweb_servers.items()
            },
        },
    }


@contextlib.contextmanager
def running_orthanc(
    tmp_path: Path,
    dicomweb_servers: Mapping[str, str | Mapping[str, Any]] | None = None,
    *,
    dicom_server: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
) -> Iterator[Orthanc]:
    """Start a private Orthanc, wait until /system answers, yield it, and stop it on exit.

    ``dicomweb_servers`` maps a name to a remote DICOMweb base URL ending in "/" (Orthanc appends "studies"
    for STOW-RS), e.g. ``{"c2p": "http://127.0.0.1:8000/dicomweb/"}``, or to a full server object
    (``{"Url": ..., "ChunkedTransfers": False, "HttpHeaders": {...}}``). ``dicom_server`` opens a C-STORE
    port (``Orthanc.dicom_port``). ``config_overrides`` are merged last, at the top level.
    Fails the test, with Orthanc's log, when it does not start.
    """
    reason = orthanc_available()
    if reason is not None:
        pytest.skip(reason)
    assert ORTHANC_BINARY is not None
    tmp_path.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    dicom_port = free_port() if dicom_server else None
    config = orthanc_config(tmp_path, http_port, dicom_port, dicomweb_servers or {})
    config.update(config_overrides or {})
    config_path = tmp_path / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = tmp_path / "orthanc.log"
    url = f"http://127.0.0.1:{http_port}"

    # Orthanc reads its options left to right and the configuration last. stdout/stderr go to a second file:
    # what Orthanc prints before its logger starts (a bad configuration file) lands there.
    console = tmp_path / "orthanc.console"
    with console.open("wb") as out:
        process = subprocess.Popen(
            [ORTHANC_BINARY, "--no-jobs", f"--logfile={log}", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "MALLOC_ARENA_MAX": "2"},
        )
    orthanc = Orthanc(
        url=url,
        dicomweb_url=f"{url}/dicom-web",
        storage=tmp_path / "storage",
        log=log,
        http=httpx.Client(timeout=60),
        dicom_port=dicom_port,
    )
    try:
        _wait_started(process, orthanc, log, console)
        yield orthanc
    finally:
        orthanc.http.close()
        _stop(process)


def _wait_started(process: subprocess.Popen[bytes], orthanc: Orthanc, log: Path, console: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            _fail_start(f"Orthanc exited with status {process.returncode}", log, console)
        with contextlib.suppress(httpx.TransportError):
            if orthanc.http.get(f"{orthanc.url}/system", timeout=2).is_success:
                return
        if time.monotonic() > deadline:
            _stop(process)
            _fail_start(f"Orthanc did not answer /system within {START_TIMEOUT_S} s", log, console)
        time.sleep(0.05)


def _fail_start(what: str, log: Path, console: Path) -> None:
    texts = [path.read_text(errors="replace")[-8000:] for path in (console, log) if path.exists()]
    pytest.fail(f"{what}; its output:\n" + "\n".join(texts), pytrace=False)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (Orthanc flushes its index and stops its jobs), SIGKILL when it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
