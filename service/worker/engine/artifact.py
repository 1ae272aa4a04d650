"""An export folder checked before anything runs it: files present, digests and embedded card agree."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.files import CARD_FILE, ONNX_FILE, TORCHSCRIPT_FILE, WEIGHTS_DATA_FILE, sha256_file
from service.errors import ArtifactInvalid, ArtifactNotFound

FILES = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}


@dataclass(frozen=True)
class Artifact:
    directory: Path
    kind: str
    card: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.directory / FILES[self.kind]

    @property
    def input_size(self) -> int:
        return int(self.card["input"]["size"])

    @property
    def output_names(self) -> list[str]:
        return [spec["name"] for spec in self.card["outputs"]]

    @property
    def digest(self) -> str:
        return str(self.card["artifacts"][FILES[self.kind]]["sha256"])


def open_artifact(directory: str | Path, kind: str, *, check_digest: bool = True) -> Artifact:
    """Read card.json and check the chosen model file against the digest it records."""
    directory = Path(directory)
    if kind not in FILES:
        raise ArtifactInvalid(f"unknown engine kind {kind!r}; expected one of {', '.join(FILES)}")
    card_file, model_file = directory / CARD_FILE, directory / FILES[kind]
    for required in (card_file, model_file):
        if not required.is_file():
            raise ArtifactNotFound(f"model artifact incomplete: {required} is missing (run `c2p export`)")
    try:
        card = json.loads(card_file.read_text())
        recorded = card["artifacts"][FILES[kind]]["sha256"]
        card["input"]["size"], card["outputs"]
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactInvalid(f"{card_file} is not a C2P export card: {err!r}") from err
    if check_digest and sha256_file(model_file) != recorded:
        raise ArtifactInvalid(f"{model_file} does not match the sha256 in {card_file}: re-export the model")
    # A graph restored from the shipped weights (models.restore) reads them from weights.bin beside it.
    data = card["artifacts"].get(WEIGHTS_DATA_FILE) if kind == "onnx" else None
    if data is not None:
        data_file = directory / WEIGHTS_DATA_FILE
        if not data_file.is_file():
            raise ArtifactNotFound(f"model artifact incomplete: {data_file} is missing")
        if check_digest and sha256_file(data_file) != data.get("sha256"):
            raise ArtifactInvalid(f"{data_file} does not match the sha256 in {card_file}: remove the folder")
    return Artifact(directory, kind, card)


def check_embedded(artifact: Artifact, embedded: dict[str, Any] | None) -> None:
    """The card inside the model file must describe the same model as card.json beside it."""
    if embedded is None:
        raise ArtifactInvalid(f"{artifact.path} carries no C2P card: it was not written by `c2p export`")
    for key in ("variant", "input", "outputs", "config"):
        if embedded.get(key) != artifact.card.get(key):
            raise ArtifactInvalid(f"{artifact.path} and its card.json disagree on {key!r}: mixed-up export folder")
