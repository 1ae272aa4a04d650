"""``c2p import-reference``: a checkpoint of the reference implementation (Yundi218/Concept-to-Pixel) as ours.

The reference's training saves ``torch.save(model.state_dict())`` of its whole C2P module. Its network is ours
laid out differently (``C2PConfig.layout = "reference"``, models.variants.Layout), so every one of its tensors
has exactly one place in our network: ``reference_key`` names it, from our key, by a short table of renames.
Import builds our network for the reference variant, expects precisely the reference names and shapes that
network implies, and writes our checkpoint (safetensors + card) only if the file has all of them and nothing
else: an unknown, missing or mis-shaped key is a ``ReferenceImportError`` naming it, never a partial load.

Reading is ``torch.load(weights_only=True)``: a pickle that carries code (or any object but tensors and plain
containers) is refused before anything in it runs.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from models.cards import INTENDED_USE
from models.checkpoint import save_checkpoint, sha256_file
from models.variants import VARIANTS, C2PConfig

REFERENCE_REPOSITORY = "Yundi218/Concept-to-Pixel"
IMPORTED_FROM = f"imported from the reference implementation {REFERENCE_REPOSITORY}"
# network.py builds only convnextv2_base: its decoder and SCFM hard-code base's channels (1024/512/256/128).
REFERENCE_VARIANTS = {"base": "c2p-reference-base-384"}
NO_OTHER_SIZES = (
    "the reference's network.py hard-codes convnextv2_base's channels (1024/512/256/128 in its decoder and SCFM), "
    "so its checkpoints are all base"
)
INTENDED_USE_IMPORTED = INTENDED_USE.replace(
    "Trained on synthetic data and packaged anatomy, not on patients",
    f"Weights {IMPORTED_FROM}, trained by its authors on the data they name (not verified here)",
)
_LISTED = 8  # names shown per kind of problem; the count says how many more
_EXAMPLES = ("bkbone.stem_0.weight", "geo_tokens", "transformer_deep.pos_encoding.pos_emb_h", "upconv5.weight")

# Our key -> the reference's, applied in order (each pattern at most once per key). Prefixes name the part;
# the last rules rename inside the interaction layers and the attentions, where the modules line up 1:1.
_BACKBONE = ("backbone.body.", "bkbone.")  # the same timm module on both sides: only the prefix differs
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^tokens\.geo$", "geo_tokens"),
    (r"^tokens\.sem$", "semantic_tokens"),
    (r"^tokens\.modality\.style\.", "modality_learner.style_compress."),
    (r"^tokens\.modality\.content\.", "modality_learner.content_compress."),
    (r"^tokens\.modality\.fuse\.", "modality_learner.fusion_mlp."),
    (r"^tokens\.project\.", "token_proj."),
    (r"^interaction\.image_tokens\.project\.", "ref_proj."),
    (r"^interaction\.image_tokens\.row$", "transformer_deep.pos_encoding.pos_emb_h"),
    (r"^interaction\.image_tokens\.col$", "transformer_deep.pos_encoding.pos_emb_w"),
    (r"^interaction\.layers\.", "transformer_deep.layers."),
    (r"^interaction\.reinject\.", "updated_feat_proj."),
    # Decoder blocks run deep to shallow: block 0 is the reference's level 5, block 2 its level 3.
    *((rf"^decoder\.blocks\.{i}\.up\.", f"upconv{5 - i}.") for i in range(3)),
    *((rf"^decoder\.blocks\.{i}\.fuse\.0\.", f"conv{5 - i}_1.") for i in range(3)),
    *((rf"^decoder\.blocks\.{i}\.fuse\.1\.", f"bn{5 - i}_1.") for i in range(3)),
    (r"^head\.embed\.", "d2_proj."),
    (r"^head\.geo_attn\.", "cross_attn_geo."),
    (r"^head\.sem_attn\.", "cross_attn_sem."),
    (r"^head\.fg\.", "kernel_generator_fg."),
    (r"^head\.bg\.", "kernel_generator_bg."),
    (r"^geo_heads\.heads\.", "geo_predictors."),
    (r"^sem_heads\.heads\.", "semantic_projectors."),
    (r"\.token_attn\.", ".token_to_image_attn."),
    (r"\.image_attn\.", ".image_to_token_attn."),
    # The reference's FeedForward is Linear, GELU, Dropout, Linear, Dropout: its second Linear is net.3.
    (r"_ffn\.0\.", "_ffn.net.0."),
    (r"_ffn\.2\.", "_ffn.net.3."),
    (r"attn(_geo|_sem)?\.(q|k|v)\.", r"attn\1.to_\2."),
    (r"attn(_geo|_sem)?\.out\.", r"attn\1.to_out.0."),
)


class ReferenceImportError(ValueError):
    """A file that is not a reference C2P checkpoint of the asked variant; the message says what is wrong."""


def reference_key(key: str) -> str:
    """Our state-dict key -> the reference's name for the same tensor (a reference-layout network's keys)."""
    ours, theirs = _BACKBONE
    if key.startswith(ours):
        return theirs + key.removeprefix(ours)
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key, count=1)
    return key


def reference_config(variant: str = "base") -> C2PConfig:
    """The config a reference checkpoint of ``variant`` (``base``, or our name for it) imports into."""
    name = REFERENCE_VARIANTS.get(variant, variant)
    if name not in REFERENCE_VARIANTS.values():
        raise ReferenceImportError(f"no reference variant {variant!r}: {NO_OTHER_SIZES} (use --variant base)")
    return VARIANTS[name]


def _unpickling_reason(err: Exception) -> str:
    """The line of torch's weights_only refusal that says what was found (not its advice to turn safety off)."""
    lines = [line.strip() for line in str(err).splitlines()]
    found = [line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")]
    return found[0] if found else lines[0]


def _unreadable(path: Path, reason: str) -> ReferenceImportError:
    return ReferenceImportError(f"{path} cannot be read as a torch.save file: truncated or not a checkpoint ({reason})")


def read_reference(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a reference checkpoint file, read without unpickling anything but tensors.

    Accepts what ``torch.save(model.state_dict())`` writes, the same under DistributedDataParallel (every key
    prefixed ``module.``), and a dict holding it as ``state_dict``; anything else is refused with the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # Old-style pickles make torch warn about their protocol before it refuses or reads them.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickling_reason(err)
        if "GLOBAL" in reason:  # the pickle names a function or class to call: code
            raise ReferenceImportError(
                f"{path} is refused: its pickle holds more than tensors ({reason}); only a plain state dict is "
                "read (torch.load weights_only=True), so nothing in the file was run"
            ) from None
        raise _unreadable(path, reason) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:
        raise _unreadable(path, str(err).split(". ")[0] if str(err) else type(err).__name__) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ReferenceImportError(
            f"{path} holds a {type(state).__name__}, not a state dict (torch.save(model.state_dict()) of the "
            "reference's C2P module)"
        )
    wrong = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if wrong or not state:
        what = f"entries that are not named tensors: {_names(wrong)}" if wrong else "nothing"
        raise ReferenceImportError(f"{path} is not a state dict of tensors: it holds {what}")
    if all(k.startswith("module.") for k in state):  # saved from inside DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    return shown + (f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def map_reference_state(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """The reference's tensors renamed to our keys; ``expected`` is our network's state dict (names, shapes).

    All or nothing: every expected name with its shape, and no other, or a ``ReferenceImportError`` naming
    what is missing, unknown or mis-shaped.
    """
    ours = {reference_key(key): key for key in expected}
    found = set(state)
    matched = found & set(ours)
    if len(matched) < len(ours) / 2:
        raise ReferenceImportError(
            f"{source} is a state dict of something else, not of the reference's C2P: {len(matched)} of the "
            f"{len(ours)} names the reference's network has are in it (expected e.g. "
            f"{', '.join(n for n in _EXAMPLES if n in ours)}; it has {_names(sorted(found))})"
        )
    problems = []
    missing = sorted(set(ours) - found)
    unknown = sorted(found - set(ours))
    shapes = sorted(
        f"{name} {list(state[name].shape)} (expected {list(expected[ours[name]].shape)})"
        for name in matched
        if state[name].shape != expected[ours[name]].shape
    )
    for kind, names in (("missing", missing), ("unknown", unknown), ("mis-shaped", shapes)):
        if names:
            problems.append(f"{len(names)} {kind}: {_names(names)}")
    if problems:
        raise ReferenceImportError(f"{source} does not fit the reference network: " + "; ".join(problems))
    return {ours[name]: tensor for name, tensor in state.items()}


def import_reference(checkpoint: str | Path, out: str | Path, variant: str = "base") -> Path:
    """Read a reference checkpoint, map it onto our network strictly, write ``out`` (.safetensors) and its card."""
    from models.network import assemble

    checkpoint = Path(checkpoint)
    config = reference_config(variant)
    state = read_reference(checkpoint)
    model = assemble(config)
    mapped = map_reference_state(state, model.state_dict(), str(checkpoint))
    model.load_state_dict(mapped, strict=True)
    card = {
        "imported": {
            "from": IMPORTED_FROM,
            "repository": f"https://github.com/{REFERENCE_REPOSITORY}",
            "file": checkpoint.name,
            "sha256": sha256_file(checkpoint),
            "variant": next(k for k, v in REFERENCE_VARIANTS.items() if v == config.name),
            "layout": config.layout,
        },
        "intended_use": INTENDED_USE_IMPORTED,
    }
    return save_checkpoint(model, out, config, card)
