"""Between the pydantic result schema (service/schema.py) and the c2p.v1 messages, through JSON.

The proto mirrors the schema field for field (tests/service/test_protos.py proves it), so one generic
path converts every model: ``model_dump(mode="json")`` -> ``json_format.ParseDict`` and back with
``MessageToDict(preserving_proto_field_name=True)`` -> ``model_validate``. The pydantic models stay the
one place where the result's rules live (bounds, literals, defaults): a message is validated by them
on the way back, and a field the proto lacks fails loudly on the way out (ParseDict refuses unknown
names) instead of being dropped.

The one place where JSON and protobuf disagree: proto3 repeated fields have no presence, so an absent
optional tuple (``window: tuple[float, float] | None``) travels as an empty list and is turned back
into None here, guided by the model's annotations.
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from collections.abc import Iterator
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel

from service.schema import Job

M = TypeVar("M", bound=Message)
B = TypeVar("B", bound=BaseModel)


def to_message(model: BaseModel, message: M) -> M:
    """Fill ``message`` (a fresh instance of the mirroring type) from ``model`` and return it."""
    json_format.ParseDict(model.model_dump(mode="json"), message)
    return message


def from_message(message: Message, model_type: type[B]) -> B:
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return model_type.model_validate(_absent_to_none(model_type, data))


def job_to_proto(job: Job) -> Any:
    """The c2p.v1.Job for ``job`` (typed ``Any`` because the generated module is loaded lazily)."""
    from service.grpc import segmentation_pb2

    return to_message(job, segmentation_pb2.Job())


def job_from_proto(message: Message) -> Job:
    return from_message(message, Job)


# -- annotations --------------------------------------------------------------------------------------


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(``T``, True) for ``T | None``; (annotation, False) otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else functools.reduce(operator.or_, args)), True
    return annotation, False


def model_class(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def reachable_models(root: type[BaseModel]) -> Iterator[type[BaseModel]]:
    """``root`` and every model its fields lead to (through optionals, lists, tuples and dicts), once each."""
    seen: set[type[BaseModel]] = set()
    pending = [root]
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        yield model
        for field in model.model_fields.values():
            pending.extend(_models_in(field.annotation))


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    cls = model_class(annotation)
    if cls is not None:
        yield cls
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _absent_to_none(model_type: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    for name, field in model_type.model_fields.items():
        if name not in data:
            continue
        inner, optional = unwrap_optional(field.annotation)
        value = data[name]
        if optional and value == [] and typing.get_origin(inner) in (list, tuple):
            data[name] = None
            continue
        cls = model_class(inner)
        if cls is not None and isinstance(value, dict):
            _absent_to_none(cls, value)
        elif isinstance(value, list) and typing.get_origin(inner) is list:
            item = model_class(typing.get_args(inner)[0])
            if item is not None:
                for entry in value:
                    _absent_to_none(item, entry)
    return data
