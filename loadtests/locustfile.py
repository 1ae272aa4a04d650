"""Locust users for c2p-serve: REST uploads and c2p.v1 gRPC calls with real DICOM, NIfTI and PNG inputs.

    locust -f loadtests/locustfile.py --headless -u 8 -r 4 -t 60s --host http://127.0.0.1:8000 \\
        --csv results/run RestUser GrpcUser

``RestUser`` posts ``/v1/segmentations?wait=S`` (multipart ``file`` parts) and now and then fetches a finished
job's NIfTI labelmap and PNG overlay; ``GrpcUser`` calls ``c2p.v1.Segmentation/Segment`` with ``wait_seconds`` and
a deadline. Each request is named after its input kind (``POST /v1/segmentations [dicom-series]``, ``Segment
[nifti-mni]``), so locust's table and CSV show each kind's latency apart: an 8-slice series and a 64x64 MR slice
have nothing in common but the URL. The inputs are real data from installed packages (``loadtests/inputs.py``),
built once per process before the first user starts.

A request counts as a failure unless the job *succeeded* within the wait, with the shape the input has; the failure
message starts with the service's own error code (REST: the JSON body's ``code``; gRPC: the ``c2p-error-code``
trailer), so locust's failure table groups them by cause (``queue_full``, ``deadline``, ``invalid_image``...).

Options beyond locust's own:

``--grpc-host HOST:PORT``   the gRPC target; default ``$LOAD_GRPC_TARGET``, else ``--host``'s host name on port 8001
                            (the service's default). The variable is deliberately not ``C2P_*``: the service
                            refuses to start when its environment holds a ``C2P_`` name it does not know, and a
                            shell that exports load-test settings often starts the service too.
``--segment-wait S``        how long each request waits for its result (default 60 s; the gRPC deadline adds 15 s).
``--api-key KEY``           sent as ``Authorization: Bearer KEY`` (REST headers, gRPC metadata); default
                            ``$LOAD_API_KEY``; none for a service running open on loopback.

Pick users by class name on the command line (``RestUser``, ``GrpcUser``, or both), or with ``--class-picker``
in the web UI.
"""

from __future__ import annotations

import collections
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import HttpUser, User, between, events, task
from locust.env import Environment
from locust.runners import MasterRunner

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository, for loadtests.inputs and the service's stubs when not installed
    sys.path.insert(0, str(ROOT))

from loadtests.inputs import KEY_ENV, WEIGHTS, LoadInput, load_inputs  # noqa: E402
from loadtests.inputs import credentials as key_credentials  # noqa: E402
from service.grpc import segmentation_pb2, segmentation_pb2_grpc  # noqa: E402

# gRPC's C core runs its own threads, which never yield to gevent: without this a blocking stub call stalls every
# user of the process until it returns. It must run before the first channel exists (gRPC's gevent docs).
grpc_gevent.init_gevent()

GRPC_ENV = "LOAD_GRPC_TARGET"
DEFAULT_GRPC_PORT = 8001
DEADLINE_MARGIN_S = 15.0  # the gRPC deadline beyond the wait: the server answers a little before it anyway
RESULT_FORMATS = {"nifti": b"\x1f\x8b", "png": b"\x89PNG\r\n\x1a\n"}  # format -> magic bytes of the answer


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--grpc-host",
        type=str,
        default=os.environ.get(GRPC_ENV, ""),
        help=f"gRPC target HOST:PORT (default ${GRPC_ENV}, else --host's host on port {DEFAULT_GRPC_PORT})",
    )
    parser.add_argument(
        "--segment-wait", type=float, default=60.0, help="seconds each request waits for its result (default 60)"
    )
    parser.add_argument(
        "--api-key", type=str, default=os.environ.get(KEY_ENV, ""), help=f"API key or token (default ${KEY_ENV})"
    )


def credentials(environment: Environment) -> list[tuple[str, str]]:
    options = environment.parsed_options
    return key_credentials(getattr(options, "api_key", "") if options else "")


@events.init.add_listener
def _build_inputs(environment: Environment, **_: Any) -> None:
    """Build the inputs before users start (a master sends nothing, so it skips the work): done inside the first
    task instead, the first second of the run would be one user blocking the whole process."""
    if not isinstance(environment.runner, MasterRunner):
        load_inputs()


def grpc_target(environment: Environment) -> str:
    """``--grpc-host``, else ``$LOAD_GRPC_TARGET`` (the option's default), else ``--host``'s host on 8001."""
    options = environment.parsed_options
    target = (getattr(options, "grpc_host", "") if options else "") or os.environ.get(GRPC_ENV, "")
    if not target:
        host = urlsplit(environment.host or "http://127.0.0.1").hostname or "127.0.0.1"
        target = f"{host}:{DEFAULT_GRPC_PORT}"
    return target.removeprefix("grpc://")


def segment_wait(environment: Environment) -> float:
    options = environment.parsed_options
    return float(getattr(options, "segment_wait", 60.0)) if options else 60.0


def shape_problem(load: LoadInput, shape: list[int]) -> str | None:
    """A wrong answer is a failure too: the service must report the input's own (z, y, x)."""
    return None if tuple(shape) == load.shape else f"wrong_shape: {shape} for {list(load.shape)}"


def input_tasks() -> dict[Callable[[Any], None], int]:
    """One task per input kind, weighted as WEIGHTS says; each calls its user's own ``segment(kind)``, so the REST
    and gRPC users share the mix. (locust calls a task in ``tasks`` with the user as its only argument.)"""

    def segment_task(kind: str) -> Callable[[Any], None]:
        def run(user: Any) -> None:
            user.segment(kind)

        run.__name__ = kind.replace("-", "_")
        return run

    return {segment_task(kind): weight for kind, weight in WEIGHTS.items()}


class RestUser(HttpUser):
    """Uploads one input per task as multipart ``file`` parts and waits for the result on the same request."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.inputs = load_inputs()
        self.wait_s = segment_wait(self.environment)
        self.finished: collections.deque[str] = collections.deque(maxlen=16)  # job ids for the result formats
        self.client.headers.update(dict(credentials(self.environment)))

    def segment(self, kind: str) -> None:
        load = self.inputs[kind]
        files = [("file", (name, data, load.content_type)) for name, data in load.files]
        params: dict[str, Any] = {"wait": self.wait_s}
        if load.modality:
            params["modality"] = load.modality
        with self.client.post(
            "/v1/segmentations",
            params=params,
            files=files,
            name=f"POST /v1/segmentations [{kind}]",
            timeout=self.wait_s + DEADLINE_MARGIN_S,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(rest_error(response))
                return
            job = response.json()
            if job.get("status") != "succeeded":
                response.failure(f"{job.get('status')}: not finished within wait={self.wait_s:g}")
                return
            problem = shape_problem(load, job["result"]["input"]["shape"])
            if problem:
                response.failure(problem)
                return
            self.finished.append(job["id"])

    tasks = input_tasks()  # one task per input kind, weighted by WEIGHTS

    @task(1)
    def result_formats(self) -> None:
        """A viewer's follow-up: the NIfTI labelmap and a PNG overlay of a finished job, made on request by the
        gateway from what the worker kept (a different cost from the upload path, and a different leak risk)."""
        if not self.finished:
            return
        job_id = random.choice(self.finished)
        for fmt, magic in RESULT_FORMATS.items():
            with self.client.get(
                f"/v1/segmentations/{job_id}/result",
                params={"format": fmt},
                name=f"GET /v1/segmentations/[id]/result?format={fmt}",
                timeout=60,
                catch_response=True,
            ) as response:
                if response.status_code != 200:
                    response.failure(rest_error(response))
                elif not response.content.startswith(magic):
                    response.failure(f"not_{fmt}: the body does not start with {fmt}'s magic bytes")


def rest_error(response: Any) -> str:
    """``CODE: message`` from the service's JSON error body; the HTTP status when there is none (a proxy's)."""
    try:
        body = response.json()
        return f"{body['code']}: {body.get('message', '')}"[:300]
    except Exception:
        return f"http_{response.status_code}: {(response.text or '')[:200]}"


class GrpcFailure(Exception):
    """What locust records for a failed call: the service's error code first, so failures group by cause."""


class GrpcUser(User):
    """Calls ``c2p.v1.Segmentation/Segment`` with the whole upload in one message and reports each call to locust."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.inputs = load_inputs()
        self.wait_s = segment_wait(self.environment)
        # Answers of volumes are larger than grpc's 4 MiB client default; uploads are whole series in one message.
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self.channel = grpc.insecure_channel(grpc_target(self.environment), options=options)
        self.stub = segmentation_pb2_grpc.SegmentationStub(self.channel)
        self.metadata = credentials(self.environment)

    def on_stop(self) -> None:
        self.channel.close()

    def segment(self, kind: str) -> None:
        load = self.inputs[kind]
        request = segmentation_pb2.SegmentRequest(
            files=[segmentation_pb2.File(name=name, data=data) for name, data in load.files],
            wait_seconds=self.wait_s,
            **({"modality": load.modality} if load.modality else {}),
        )
        exception: Exception | None = None
        length = 0
        start = time.perf_counter()
        try:
            job = self.stub.Segment(request, timeout=self.wait_s + DEADLINE_MARGIN_S, metadata=self.metadata)
            length = job.ByteSize()
            if job.status != "succeeded":
                exception = GrpcFailure(f"{job.status}: not finished within wait_seconds={self.wait_s:g}")
            else:
                problem = shape_problem(load, list(job.result.input.shape))
                exception = GrpcFailure(problem) if problem else None
        except grpc.RpcError as err:
            exception = GrpcFailure(grpc_error(err))
        elapsed_ms = (time.perf_counter() - start) * 1000
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"Segment [{kind}]",
            response_time=elapsed_ms,
            response_length=length,
            exception=exception,
            context={},
        )

    tasks = input_tasks()  # one task per input kind, weighted by WEIGHTS


def grpc_error(err: grpc.RpcError) -> str:
    """``CODE: details (STATUS)`` with the ``c2p-error-code`` trailer when the service set one."""
    status = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    trailers = dict(err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else {}
    code = trailers.get("c2p-error-code") or (status.name.lower() if status else "rpc_error")
    return f"{code}: {details} ({status.name if status else 'no status'})"[:300]
