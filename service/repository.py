"""The model repository: which models a deployment has on disk, and which of them a worker loads.

A repository is a folder of ``NAME/VERSION/`` export folders (what ``c2p export`` writes: ``card.json`` and the
model file), as Triton and KServe lay theirs out; the model ``C2P_MODEL`` names (by default the bundled one) is
served beside them under its variant name, with the first digits of its artifact digest as its version. A
worker loads every entry unless ``C2P_WORKER__MODELS`` narrows the list.

Names and versions reach file paths, Redis keys and URLs, so both must be plain: letters, digits, ``_ . -``,
not starting with a dot or dash, at most 64 characters. A repository folder that breaks the rules or holds no
card is skipped with a warning that says why, so one bad upload of a model cannot stop the others being served.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.files import CARD_FILE, ONNX_FILE, TORCHSCRIPT_FILE
from service.errors import InvalidRequest

log = logging.getLogger(__name__)

PLAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MODEL_FILES = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
# The default model's version: the first digits of its artifact digest (what results and the index report).
VERSION_DIGITS = 12


@dataclass(frozen=True)
class ModelEntry:
    """A model a worker may load: ``source`` is an export folder, a checkpoint or a variant name (``C2P_MODEL``).

    ``version`` is None for the ``C2P_MODEL`` entry until its artifact exists (its version is its digest)."""

    name: str | None
    version: str | None
    source: str
    default: bool = False

    def label(self) -> str:
        name = self.name or self.source
        return f"{name}:{self.version}" if self.version else name


def plain(value: str, what: str) -> str:
    """``value`` if it is a plain name (module docstring); InvalidRequest naming the rule otherwise."""
    if not isinstance(value, str) or not PLAIN_RE.fullmatch(value):
        raise InvalidRequest(
            f"{what} {value!r} is not allowed: use letters, digits and _ . - (at most 64, not starting with . or -)"
        )
    return value


def parse_reference(text: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:VERSION`` (the REST ``?model=`` and ``C2P_WORKER__MODELS`` spelling) -> (name, version)."""
    name, sep, version = text.strip().partition(":")
    plain(name, "model name")
    if sep:
        plain(version, "model version")
        return name, version
    return name, None


def scan(repository: Path) -> list[ModelEntry]:
    """The repository's ``NAME/VERSION/`` export folders, in name and version order; bad folders are skipped."""
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository {repository} is not a folder")
    entries = []
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        if not PLAIN_RE.fullmatch(model_dir.name):
            log.warning("model repository: skipping %r (not a plain model name)", model_dir.name)
            continue
        for version_dir in sorted((p for p in model_dir.iterdir() if p.is_dir()), key=lambda p: version_key(p.name)):
            names = (model_dir.name, version_dir.name)
            if not PLAIN_RE.fullmatch(version_dir.name):
                log.warning("model repository: skipping %s/%r (not a plain version)", *names)
            elif not (version_dir / CARD_FILE).is_file():
                log.warning("model repository: skipping %s/%s (no card.json: not an export folder)", *names)
            else:
                entries.append(ModelEntry(model_dir.name, version_dir.name, str(version_dir)))
    return entries


def version_key(version: str) -> tuple[int, int, str]:
    """Versions order numerically where they are numbers (2 before 10), after the ones that are not."""
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def entries(default_model: str, repository: Path | None) -> list[ModelEntry]:
    """Everything a worker could load: the ``C2P_MODEL`` model first, then the repository's."""
    found = [ModelEntry(None, None, default_model, default=True)]
    if repository is not None:
        found += scan(repository)
    return found


def narrow(available: list[ModelEntry], wanted: str | None, default_name: str | None = None) -> list[ModelEntry]:
    """The entries ``C2P_WORKER__MODELS`` (comma-separated ``NAME`` or ``NAME:VERSION``) names; all when unset.

    The ``C2P_MODEL`` entry answers to its source (e.g. the variant name) or ``default_name``. A name that
    matches nothing is an error at start-up, naming what there is: a worker must not quietly serve less."""
    if not wanted or not wanted.strip():
        return list(available)
    chosen: list[ModelEntry] = []
    for item in (part for part in wanted.split(",") if part.strip()):
        name, version = parse_reference(item)
        hits = [
            e
            for e in available
            if (name in (e.name, default_name, e.source) if e.default else name == e.name)
            and (version is None or version == e.version)
        ]
        if not hits:
            known = ", ".join(e.label() for e in available)
            raise ValueError(f"C2P_WORKER__MODELS names {item.strip()!r}, which is not in the repository ({known})")
        chosen += [e for e in hits if e not in chosen]
    return chosen


def describe(entry: ModelEntry, kind: str) -> dict[str, Any] | None:
    """The model's register entry (name, version, digest, default) read from its card alone, without loading it, or
    None when only exporting it would tell (a checkpoint, a variant without a shipped graph): a gateway registers
    what it can read, so jobs are routed before any worker has started (service/queue/presence.py)."""
    from models.restore import shipped_variant

    folder = Path(entry.source)
    if (folder / CARD_FILE).is_file():
        card_file = folder / CARD_FILE
    elif kind == "onnx" and (shipped := shipped_variant(entry.source)) is not None:
        card_file = shipped[2]  # the restored folder's card.json is this file, so its digest is the same
    else:
        return None
    try:
        card = json.loads(card_file.read_text())
        digest = str(card["artifacts"][MODEL_FILES[kind]]["sha256"])
        variant = str(card.get("variant") or "c2p")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {
        "name": entry.name or variant,
        "version": entry.version or digest[:VERSION_DIGITS],
        "digest": digest,
        "default": entry.default,
    }


def readable(default_model: str, repository: Path | None, kind: str) -> list[dict[str, Any]]:
    """The register entries of every model a process can describe from its own disk (``describe``)."""
    return [d for e in entries(default_model, repository) if (d := describe(e, kind)) is not None]
