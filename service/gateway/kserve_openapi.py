"""The Open Inference Protocol's REST routes described for OpenAPI: the error shape and the inference body.

Kept apart from the routes so that what clients (and schemathesis) read is in one place and the routes stay short.
"""

from __future__ import annotations

from typing import Any

from service.dataplane.oip import DATATYPES, INPUT, OUTPUTS
from service.inputs import tensor

HEADER_LENGTH = "Inference-Header-Content-Length"

# Every error of these routes, as v2_error writes it; documented so that clients (and schemathesis) know the shape.
V2_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "code"],
    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
}
V2_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": {"application/json": {"schema": V2_ERROR_SCHEMA}}}
    for status, description in (
        (400, "malformed request or tensor"),
        (401, "missing or invalid credentials"),
        (404, "unknown model or version"),
        (413, "request or tensor over the limits"),
        (422, "the job failed on this input"),
        (429, "queue full: retry after the Retry-After header's seconds"),
        (503, "Redis or workers unavailable, or the model not ready"),
        (504, "no result within the wait; the job was deleted"),
    )
}

INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "An inference request: JSON, or JSON then binary tensor data (Inference-Header-Content-Length"
        " gives the JSON's length; gzip or deflate Content-Encoding accepted)",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "layout": {"type": "string", "description": ", ".join(tensor.LAYOUTS)},
                                "modality": {"type": "string"},
                                "timeout": {"type": "number", "minimum": 0, "description": "microseconds"},
                                "binary_data_output": {"type": "boolean"},
                            },
                        },
                        "inputs": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "datatype", "shape"],
                                "properties": {
                                    "name": {"type": "string", "enum": [INPUT]},
                                    "datatype": {"type": "string", "enum": list(DATATYPES)},
                                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                                    "data": {"type": "array", "description": "flat, or nested as the shape"},
                                    "parameters": {
                                        "type": "object",
                                        "properties": {
                                            "binary_data_size": {"type": "integer", "minimum": 0},
                                            "layout": {"type": "string"},
                                            "modality": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": list(OUTPUTS)},
                                    "parameters": {
                                        "type": "object",
                                        "properties": {"binary_data": {"type": "boolean"}},
                                    },
                                },
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "length of the JSON part when binary tensor data follows it",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
    "responses": {
        "200": {
            "description": "the outputs: JSON, or JSON then binary output data when any output is binary",
            "headers": {
                HEADER_LENGTH: {
                    "description": "length of the JSON part when binary output data follows it",
                    "schema": {"type": "integer", "minimum": 0},
                }
            },
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["model_name", "model_version", "outputs"],
                        "properties": {
                            "id": {"type": "string"},
                            "model_name": {"type": "string"},
                            "model_version": {"type": "string"},
                            "parameters": {"type": "object"},
                            "outputs": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["name", "datatype", "shape"],
                                    "properties": {
                                        "name": {"type": "string", "enum": list(OUTPUTS)},
                                        "datatype": {"type": "string"},
                                        "shape": {"type": "array", "items": {"type": "integer"}},
                                        "data": {"type": "array"},
                                        "parameters": {"type": "object"},
                                    },
                                },
                            },
                        },
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}
