"""One Settings object, built once at start-up from ``C2P_*`` variables and passed down; no globals.

Nested groups read ``C2P_<GROUP>__<FIELD>`` (e.g. ``C2P_ENGINE__KIND=torchscript``). A misspelt
variable would silently fall back to a default, so unknown ``C2P_*`` names are refused at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.registry import DEFAULT_VARIANT

ENV_PREFIX = "C2P_"
NESTED_DELIMITER = "__"


class EngineSettings(BaseModel):
    kind: Literal["onnx", "torchscript"] = "onnx"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # 0 lets the runtime use every physical core; set it to the CPU limit of the container.
    intra_op_threads: int = Field(0, ge=0, le=256)
    inter_op_threads: int = Field(1, ge=1, le=64)
    max_batch_size: int = Field(16, ge=1, le=1024)
    # ONNX Runtime's idle threads spin for a while after each run. That buys a little latency on a
    # dedicated core and steals CPU from everything else in the process (decoding, the batcher).
    spin_wait: bool = False
    warmup: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=1, le=65535)
    redis_url: str | None = None
    # A variant name (its shipped weights), a checkpoint (NAME.safetensors + NAME.json) or an export folder.
    model: str = DEFAULT_VARIANT
    # Where exports of models given by name or checkpoint are cached, one folder per weights digest.
    artifacts_dir: Path = Path.home() / ".cache" / "c2p-serve" / "artifacts"
    engine: EngineSettings = EngineSettings()


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``C2P_*`` names that no setting reads (typos that would otherwise be ignored)."""
    known = set()
    for name, field in Settings.model_fields.items():
        key = ENV_PREFIX + name.upper()
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            known.update(key + NESTED_DELIMITER + sub.upper() for sub in annotation.model_fields)
        else:
            known.add(key)
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from the environment, then explicit overrides (the CLI's flags)."""
    environ = os.environ if environ is None else environ
    unknown = unknown_variables(environ)
    if unknown:
        raise ValueError(f"unknown settings in the environment: {', '.join(unknown)}")
    settings = Settings()
    if overrides:
        settings = Settings.model_validate(
            {**settings.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )
    return settings
