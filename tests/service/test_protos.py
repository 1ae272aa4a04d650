"""The gRPC contracts: generated code that follows proto/, a c2p.v1 schema that cannot drift from the
pydantic one, and an Open Inference Protocol that is wire-identical to what tritonclient speaks."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from pydantic import BaseModel

import service.grpc
from service.grpc import codegen, inference_pb2, segmentation_pb2
from service.grpc.convert import (
    from_message,
    job_from_proto,
    job_to_proto,
    model_class,
    reachable_models,
    unwrap_optional,
)
from service.schema import (
    Code,
    ConceptInfo,
    ErrorInfo,
    Forwarding,
    InputInfo,
    Job,
    Mask,
    ModelInfo,
    Preprocessing,
    Reliability,
    SegmentationResult,
    SliceMask,
    SliceReliability,
    Timings,
)

ROOT = Path(__file__).resolve().parents[2]
INTEGERS = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
}
FLOATS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}

# -- the c2p.v1 messages mirror the pydantic schema ------------------------------------------------------


def _scalar_ok(annotation: Any, field: FieldDescriptor) -> bool:
    if annotation is str or typing.get_origin(annotation) is Literal:
        return field.type == FieldDescriptor.TYPE_STRING
    if annotation is bool:
        return field.type == FieldDescriptor.TYPE_BOOL
    if annotation is int:
        return field.type in INTEGERS
    if annotation is float:
        return field.type in FLOATS
    if annotation is dt.datetime:
        return field.message_type is not None and field.message_type.full_name == "google.protobuf.Timestamp"
    cls = model_class(annotation)
    if cls is not None:
        return field.message_type is not None and field.message_type.name == cls.__name__
    return False


def _compatible(annotation: Any, field: FieldDescriptor) -> str | None:
    """None when ``field`` can carry ``annotation``'s JSON form through json_format; else why not."""
    inner, optional = unwrap_optional(annotation)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    repeated = field.label == FieldDescriptor.LABEL_REPEATED
    is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
    if origin is dict:
        if not is_map:
            return "a dict needs a map"
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        value_type, value_optional = unwrap_optional(args[1])
        if args[0] is not str or key.type != FieldDescriptor.TYPE_STRING:
            return "map keys must be strings"
        if value_optional:
            ok = value.message_type is not None and value.message_type.full_name == "google.protobuf.Value"
            return None if ok else "dict values that may be None need google.protobuf.Value"
        return None if _scalar_ok(value_type, value) else "map value type differs"
    if origin in (list, tuple):
        if not repeated or is_map:
            return "a list or tuple needs a repeated field"
        items = {a for a in args if a is not Ellipsis}
        if len(items) != 1:
            return "tuples must be homogeneous"
        (item,) = items
        if typing.get_origin(item) is list:  # a matrix: one ListValue per row
            ok = field.message_type is not None and field.message_type.full_name == "google.protobuf.ListValue"
            return None if ok else "a list of lists needs repeated google.protobuf.ListValue"
        return None if _scalar_ok(item, field) else "item type differs"
    if repeated:
        return "a single value cannot be a repeated field"
    if not _scalar_ok(inner, field):
        return f"type differs ({inner!r})"
    if field.message_type is None and optional != field.has_presence:  # messages always have presence
        return "optional in one and not the other"
    return None


def test_every_model_reachable_from_job_has_a_mirroring_message() -> None:
    messages = segmentation_pb2.DESCRIPTOR.message_types_by_name
    models = list(reachable_models(Job))
    assert {m.__name__ for m in models} >= {"Job", "SegmentationResult", "SliceReliability", "Timings"}
    problems = []
    for model in models:
        message: Descriptor | None = messages.get(model.__name__)
        if message is None:
            problems.append(f"{model.__name__}: no message in segmentation.proto")
            continue
        model_fields, proto_fields = set(model.model_fields), set(message.fields_by_name)
        problems += [f"{model.__name__}.{name}: missing in the proto" for name in sorted(model_fields - proto_fields)]
        problems += [f"{model.__name__}.{name}: not in the schema" for name in sorted(proto_fields - model_fields)]
        for name in sorted(model_fields & proto_fields):
            why = _compatible(model.model_fields[name].annotation, message.fields_by_name[name])
            if why:
                problems.append(f"{model.__name__}.{name}: {why}")
    assert not problems, "\n".join(problems)


def test_the_agreement_check_catches_drift() -> None:
    """The checker above is what keeps the two in step, so it must be able to fail."""
    fields = segmentation_pb2.DESCRIPTOR.message_types_by_name["SliceReliability"].fields_by_name
    assert _compatible(dict[str, float], fields["geometry_measured"]) is not None
    assert _compatible(dict[str, float | None], fields["geometry_predicted"]) is not None
    inputs = segmentation_pb2.DESCRIPTOR.message_types_by_name["InputInfo"].fields_by_name
    assert _compatible(str, inputs["modality"]) is not None  # the proto says optional
    assert _compatible(int | None, inputs["channels"]) is not None
    assert _compatible(tuple[str, str], inputs["shape"]) is not None
    assert _compatible(list[float] | None, inputs["affine"]) is not None


def full_job() -> Job:
    """A job with every field of every model set (and None where the schema allows a None inside a value)."""
    names = ["bbox_xmin", "area", "perimeter"]
    slices = [
        SliceReliability(
            index=i,
            score=0.25 + i / 10,
            level="medium",
            suppressed=bool(i),
            outlier=not i,
            agreement=0.9,
            consistency=0.8,
            geometry_agreement=0.7,
            view_weights=(0.5, 0.25, 0.125),
            view_inconsistency=(0.1, 0.2, 0.3),
            blank=True,
            geometry_predicted={n: 0.1 * (k + 1) for k, n in enumerate(names)},
            geometry_measured={"bbox_xmin": 0.5, "area": 0.0, "perimeter": None},
        )
        for i in range(2)
    ]
    created = dt.datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
    result = SegmentationResult(
        model=ModelInfo(name="c2p-test-64", version="abcd1234", digest="0" * 64, engine="onnx"),
        input=InputInfo(
            format="nifti",
            modality="CT",
            shape=(2, 96, 128),
            channels=1,
            spacing=(2.5, 0.9, 0.8),
            orientation="LPS",
            affine=[[-0.8, 0, 0, 21.2], [0, -0.9, 0, 31.1], [0, 0, 2.5, 30], [0, 0, 0, 1]],
            stored_orientation="RAS",
            preprocessing=Preprocessing(
                method="ct-window",
                window=(40, 400),
                percentiles=(0.5, 99.5),
                input_size=64,
                pixels_per_model_pixel=(1.5, 2.0),
            ),
        ),
        mask=Mask(
            size=(96, 128),
            slices=[SliceMask(index=0, counts="PXn0", area=3_000_000_000), SliceMask(index=1, counts="", area=0)],
        ),
        reliability=Reliability(
            score=0.5, level="low", suppressed=False, reason="blank_input", outlier_slices=[1], slices=slices
        ),
        timings=Timings(queue_ms=1.5, decode_ms=2.25, inference_ms=3.125, encode_ms=4.0),
        concept=ConceptInfo(
            name="lesion on CT",
            code=Code(scheme="SCT", value="52988006", meaning="Lesion"),
            category=Code(scheme="SCT", value="49755003", meaning="Morphologically Abnormal Structure"),
            similarity=0.75,
        ),
        intended_use="RESEARCH USE ONLY (test)",
    )
    return Job(
        id="A" * 22,
        status="succeeded",
        created_at=created,
        updated_at=created + dt.timedelta(seconds=1),
        deliveries=2,
        error=ErrorInfo(code="none", message="set only to cover the field"),
        result=result,
        forwarding=Forwarding(
            status="failed",
            attempts=3,
            destination="http://pacs.example/dicom-web/",
            sop_instance_uid="1.2.3.4",
            error="HTTP 503",
            updated_at=created + dt.timedelta(seconds=2),
        ),
    )


def _unset_fields(value: Any, path: str = "job") -> Iterator[str]:
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _unset_fields(getattr(value, name), f"{path}.{name}")
    elif value is None or (isinstance(value, list | tuple | dict) and not value):
        yield path
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _unset_fields(item, f"{path}[{i}]")


def test_a_full_job_round_trips_through_the_proto_and_the_wire() -> None:
    job = full_job()
    assert list(_unset_fields(job)) == [], "the fixture must fill every field"
    message = job_to_proto(job)
    wire = message.SerializeToString()
    back = job_from_proto(segmentation_pb2.Job.FromString(wire))
    assert back == job
    assert back.model_dump(mode="json") == job.model_dump(mode="json")
    measured = message.result.reliability.slices[0].geometry_measured
    assert measured["perimeter"].WhichOneof("kind") == "null_value"
    assert measured["area"].number_value == 0.0
    assert [v.number_value for v in message.result.input.affine[0].values] == [-0.8, 0, 0, 21.2]


def test_absent_optionals_round_trip_as_none() -> None:
    job = full_job()
    bare_input = job.result.input.model_copy(
        update={
            "modality": None,
            "spacing": None,
            "orientation": None,
            "affine": None,
            "stored_orientation": None,
            "preprocessing": Preprocessing(method="rgb", input_size=64),
        }
    )
    queued = job.model_copy(update={"status": "queued", "deliveries": 0, "error": None, "result": None})
    assert job_from_proto(job_to_proto(queued)) == queued
    finished = job.model_copy(update={"error": None, "result": job.result.model_copy(update={"input": bare_input})})
    message = job_to_proto(finished)
    assert not message.result.input.HasField("modality") and len(message.result.input.spacing) == 0
    assert not message.HasField("error")
    back = job_from_proto(message)
    assert back == finished
    assert back.result is not None and back.result.input.preprocessing.window is None


def test_a_message_the_schema_refuses_is_refused() -> None:
    """The pydantic rules still apply to what arrives as a message (bounds, literals)."""
    message = job_to_proto(full_job())
    message.result.reliability.score = 1.5
    with pytest.raises(ValueError, match="less than or equal to 1"):
        job_from_proto(message)
    message = job_to_proto(full_job())
    message.status = "done"
    with pytest.raises(ValueError, match="status"):
        from_message(message, Job)


# -- the Open Inference Protocol is tritonclient's ---------------------------------------------------------


def _triton_file() -> descriptor_pb2.FileDescriptorProto:
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    proto = descriptor_pb2.FileDescriptorProto()
    service_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto


def test_inference_messages_are_identical_to_tritonclients() -> None:
    theirs = _triton_file()
    ours = descriptor_pb2.FileDescriptorProto()
    inference_pb2.DESCRIPTOR.CopyToProto(ours)
    assert ours.package == theirs.package == "inference"
    their_messages = {m.name: m for m in theirs.message_type}
    required = {
        "ServerLiveRequest",
        "ServerLiveResponse",
        "ServerReadyRequest",
        "ServerReadyResponse",
        "ModelReadyRequest",
        "ModelReadyResponse",
        "ServerMetadataRequest",
        "ServerMetadataResponse",
        "ModelMetadataRequest",
        "ModelMetadataResponse",
        "InferParameter",
        "InferTensorContents",
        "ModelInferRequest",
        "ModelInferResponse",
    }
    assert {m.name for m in ours.message_type} == required
    for message in ours.message_type:
        assert message == their_messages[message.name], message.name  # fields, numbers, types, nesting, maps

    (service,) = ours.service
    (their_service,) = theirs.service
    assert service.name == their_service.name == "GRPCInferenceService"
    their_methods = {m.name: m for m in their_service.method}
    assert {m.name for m in service.method} == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    }
    for method in service.method:
        theirs_m = their_methods[method.name]
        assert (method.input_type, method.output_type) == (theirs_m.input_type, theirs_m.output_type)
        assert (method.client_streaming, method.server_streaming) == (False, False)


def test_tritonclient_requests_parse_byte_for_byte() -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2

    image = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    tensor = grpcclient.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    request = service_pb2.ModelInferRequest(model_name="c2p", model_version="1", id="r1")
    request.inputs.extend([tensor._get_tensor()])
    request.raw_input_contents.extend([tensor._get_content()])
    request.outputs.add(name="mask")
    request.parameters["binary_data_output"].bool_param = True
    wire = request.SerializeToString()

    ours = inference_pb2.ModelInferRequest.FromString(wire)
    assert ours.SerializeToString() == wire
    assert ours.inputs[0].datatype == "UINT8" and list(ours.inputs[0].shape) == [2, 8, 8, 3]
    assert np.frombuffer(ours.raw_input_contents[0], dtype=np.uint8).reshape(image.shape).tolist() == image.tolist()

    response = inference_pb2.ModelInferResponse(model_name="c2p", id="r1")
    output = response.outputs.add(name="score", datatype="FP32", shape=[2])
    output.parameters["note"].string_param = "x"
    response.raw_output_contents.append(np.array([0.5, 0.25], dtype="<f4").tobytes())
    theirs = service_pb2.ModelInferResponse.FromString(response.SerializeToString())
    assert theirs.SerializeToString() == response.SerializeToString()
    result = grpcclient.InferResult(theirs)
    assert result.as_numpy("score").tolist() == [0.5, 0.25]


# -- code generation ---------------------------------------------------------------------------------------


def test_generated_code_is_the_package_service_grpc_gen() -> None:
    assert segmentation_pb2.__name__ == "service.grpc.gen.c2p.v1.segmentation_pb2"
    assert segmentation_pb2.Job.__module__ == segmentation_pb2.__name__
    assert service.grpc.segmentation_pb2_grpc.SegmentationStub is not None
    assert "c2p" not in sys.modules and "inference" not in sys.modules  # no top-level leftovers of protoc
    assert codegen.is_current()
    for path in (codegen.GEN_DIR).rglob("*.py"):
        text = path.read_text()
        assert "from c2p" not in text and "from inference" not in text, path


def test_our_inference_module_and_tritonclients_coexist() -> None:
    """Both define inference.* messages; ours lives in a private descriptor pool, so either import order works."""
    code = (
        "import {first}\nimport {second}\n"
        "from service.grpc import inference_pb2\n"
        "from tritonclient.grpc import service_pb2\n"
        "assert inference_pb2.ModelInferRequest is not service_pb2.ModelInferRequest\n"
    )
    for first, second in [
        ("service.grpc.gen.inference.grpc_service_pb2", "tritonclient.grpc"),
        ("tritonclient.grpc", "service.grpc.gen.inference.grpc_service_pb2"),
    ]:
        run = subprocess.run(
            [sys.executable, "-c", code.format(first=first, second=second)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stderr


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    root = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", root)
    return root


def _add_field(proto_root: Path) -> None:
    path = proto_root / "c2p" / "v1" / "segmentation.proto"
    text = path.read_text()
    assert "  bytes data = 2;\n}" in text
    path.write_text(text.replace("  bytes data = 2;\n}", "  bytes data = 2;\n  string content_type = 3;\n}", 1))


def test_codegen_is_idempotent_and_follows_the_protos(proto_copy: Path, tmp_path: Path) -> None:
    gen = tmp_path / "pkg" / "gen"
    codegen.ensure_generated(proto_copy, gen, "pkg.gen")
    first_hash = (gen / codegen.HASH_FILE).read_text().strip()
    assert first_hash == codegen.proto_hash(proto_copy)
    grpc_module = (gen / "c2p" / "v1" / "segmentation_pb2_grpc.py").read_text()
    assert "from pkg.gen.c2p.v1 import segmentation_pb2 as" in grpc_module
    assert "'pkg.gen.c2p.v1.segmentation_pb2'" in (gen / "c2p" / "v1" / "segmentation_pb2.py").read_text()
    assert "_descriptor_pool.DescriptorPool()" in (gen / "inference" / "grpc_service_pb2.py").read_text()
    for folder in ("", "c2p", "c2p/v1", "inference"):
        assert (gen / folder / "__init__.py").is_file()
    inode = gen.stat().st_ino

    codegen.ensure_generated(proto_copy, gen, "pkg.gen")  # nothing changed: nothing written
    assert gen.stat().st_ino == inode

    os.utime(proto_copy / "c2p" / "v1" / "segmentation.proto")  # a newer mtime alone is not a change
    codegen.ensure_generated(proto_copy, gen, "pkg.gen")
    assert gen.stat().st_ino == inode

    _add_field(proto_copy)
    assert not codegen.is_current(proto_copy, gen)
    codegen.ensure_generated(proto_copy, gen, "pkg.gen")
    assert gen.stat().st_ino != inode
    assert (gen / codegen.HASH_FILE).read_text().strip() != first_hash
    assert "content_type" in (gen / "c2p" / "v1" / "segmentation_pb2.pyi").read_text()

    (gen / "inference" / "grpc_service_pb2_grpc.py").unlink()  # a damaged tree is remade
    codegen.ensure_generated(proto_copy, gen, "pkg.gen")
    assert (gen / "inference" / "grpc_service_pb2_grpc.py").is_file()
    assert not list(gen.parent.glob(".gen-*")), "no staging folder left behind"

    # The generated package imports under its own name (in a child: this process has c2p.v1 already).
    code = (
        "from pkg.gen.c2p.v1 import segmentation_pb2, segmentation_pb2_grpc\n"
        "assert 'content_type' in segmentation_pb2.File.DESCRIPTOR.fields_by_name\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert run.returncode == 0, run.stderr


def test_concurrent_starts_generate_once(proto_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = tmp_path / "gen"
    (tmp_path / ".gen-new-killed").mkdir()  # a generation that died halfway
    runs = []
    real = codegen._run_protoc

    def counted(*args: Any) -> None:
        runs.append(threading.get_ident())
        real(*args)

    monkeypatch.setattr(codegen, "_run_protoc", counted)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            codegen.ensure_generated(proto_copy, gen, "gen")
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(runs) == 1
    assert codegen.is_current(proto_copy, gen)
    assert not (tmp_path / ".gen-new-killed").exists()


def test_codegen_leaves_no_lock_file(proto_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock is the generated folder's parent itself (made when missing): nothing is left in the temp dir or
    beside the package, whichever way generation is started (on import, ``--force``, setup.py's ``_locked``)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert tempfile.gettempdir() == str(temp)
    parent = tmp_path / "not" / "yet" / "pkg"
    gen = parent / "gen"

    with codegen._locked(gen):
        assert parent.is_dir() and not gen.exists()
        # Held on the parent folder, across processes: another one cannot take it meanwhile.
        probe = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "try:\n"
            "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except BlockingIOError:\n"
            "    sys.exit(3)\n"
        )
        held = subprocess.run([sys.executable, "-c", probe, str(parent)], capture_output=True, text=True, check=False)
        assert held.returncode == 3, held.stderr
        codegen.generate(proto_copy, gen, "pkg.gen")  # as setup.py does under the lock
    freed = subprocess.run([sys.executable, "-c", probe, str(parent)], capture_output=True, text=True, check=False)
    assert freed.returncode == 0, freed.stderr

    _add_field(proto_copy)
    codegen.ensure_generated(proto_copy, gen, "pkg.gen")
    assert codegen.main(["--proto-root", str(proto_copy), "--out", str(gen), "--package", "pkg.gen", "--force"]) == 0
    assert codegen.is_current(proto_copy, gen)
    assert not list(temp.glob("c2p-grpc-codegen-*.lock"))
    assert [path.name for path in parent.iterdir()] == ["gen"]


def test_codegen_failures_are_clear(proto_copy: Path, tmp_path: Path) -> None:
    broken = proto_copy / "c2p" / "v1" / "segmentation.proto"
    broken.write_text(broken.read_text().replace("message File {", "message File {{", 1))
    with pytest.raises(codegen.CodegenError, match=r"segmentation\.proto"):
        codegen.ensure_generated(proto_copy, tmp_path / "gen", "gen")
    assert not (tmp_path / "gen").exists()

    with pytest.raises(codegen.CodegenError, match="reinstall"):
        codegen.ensure_generated(tmp_path / "missing", tmp_path / "gen", "gen")

    # An installed wheel: generated code, no protos (site-packages/proto may be another project's). It is
    # used as built.
    shutil.copytree(codegen.GEN_DIR, tmp_path / "wheel" / "gen")
    (tmp_path / "wheel" / "proto").mkdir()
    for root in (tmp_path / "missing", tmp_path / "wheel" / "proto"):
        codegen.ensure_generated(root, tmp_path / "wheel" / "gen", "gen")


def test_codegen_command_line(proto_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gen"
    assert codegen.main(["--proto-root", str(proto_copy), "--out", str(out), "--check"]) == 1
    assert codegen.main(["--proto-root", str(proto_copy), "--out", str(out), "--package", "gen"]) == 0
    assert codegen.main(["--proto-root", str(proto_copy), "--out", str(out), "--check"]) == 0
    assert capsys.readouterr().out.split() == ["stale", "current"]
