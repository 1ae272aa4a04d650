from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.registry import DEFAULT_VARIANT
from service.config import load_settings, unknown_variables


def test_defaults_are_the_embedded_mode() -> None:
    settings = load_settings({})
    assert settings.model == DEFAULT_VARIANT
    assert (settings.host, settings.port, settings.grpc_port) == ("127.0.0.1", 8000, 8001)
    assert settings.engine.kind == "onnx" and settings.engine.device == "auto"


def test_environment_and_nested_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C2P_PORT", "9000")
    monkeypatch.setenv("C2P_ENGINE__KIND", "torchscript")
    monkeypatch.setenv("C2P_ENGINE__INTRA_OP_THREADS", "2")
    settings = load_settings()
    assert settings.port == 9000
    assert settings.engine.kind == "torchscript" and settings.engine.intra_op_threads == 2


def test_cli_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C2P_PORT", "9000")
    assert load_settings(port=9100, host=None).port == 9100


def test_misspelt_variables_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C2P_ENGNIE__KIND", "onnx")
    monkeypatch.setenv("C2P_PROT", "1")
    with pytest.raises(ValueError, match="C2P_ENGNIE__KIND, C2P_PROT"):
        load_settings()
    assert unknown_variables({"C2P_ENGINE__KIND": "onnx", "HOME": "/root"}) == []


@pytest.mark.parametrize(("name", "value"), [("C2P_PORT", "0"), ("C2P_ENGINE__KIND", "tensorrt")])
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        load_settings()
