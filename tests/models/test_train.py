"""Loss terms against hand-computed values, augmentation keeping targets true, and a trainer that learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.geometry import ATTRIBUTE_SLICES, measure
from models.train.augment import AugmentConfig, augment
from models.train.config import TrainConfig, load_train_config
from models.train.loss import boundary_weights, dice_loss, geometry_loss, semantic_loss, structure_loss
from models.train.trainer import Trainer, dice_scores, learning_rate


def test_dice_loss_by_hand() -> None:
    gt = torch.zeros(1, 1, 4, 4)
    gt[..., :2, :] = 1  # 8 pixels
    logits = torch.full((1, 1, 4, 4), -1e4)
    logits[..., :1, :] = 1e4  # predicts 4 of them
    # 1 - (2*4 + 1) / (4 + 8 + 1) = 1 - 9/13
    assert dice_loss(logits, gt).item() == pytest.approx(1 - 9 / 13, abs=1e-6)


def test_structure_loss_is_small_when_right_and_large_when_wrong() -> None:
    gt = torch.zeros(1, 1, 32, 32)
    gt[..., 8:24, 8:24] = 1
    right = structure_loss((gt * 2 - 1) * 20, gt).item()
    wrong = structure_loss((1 - gt * 2) * 20, gt).item()
    assert right < 0.01 and wrong > 0.9


def test_boundary_weights_by_hand() -> None:
    gt = torch.zeros(1, 1, 64, 64)
    gt[..., :, 32:] = 1
    weights = boundary_weights(gt)
    assert weights[0, 0, 32, 0].item() == pytest.approx(1.0)  # 31x31 window entirely background
    # At the edge column 32: the window holds 15 background and 16 foreground columns (of 31).
    assert weights[0, 0, 32, 32].item() == pytest.approx(1 + 5 * (1 - 16 / 31), abs=1e-5)


def test_separable_boundary_weights_equal_the_31x31_pool() -> None:
    gt = (torch.rand(2, 1, 48, 40, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    pooled = torch.nn.functional.avg_pool2d(gt, 31, stride=1, padding=15, count_include_pad=False)
    torch.testing.assert_close(boundary_weights(gt), 1 + 5 * (pooled - gt).abs(), atol=1e-5, rtol=0)
    torch.testing.assert_close(boundary_weights(1 - gt), boundary_weights(gt), atol=1e-5, rtol=0)


def test_geometry_loss_ignores_invalid_entries() -> None:
    predicted = torch.zeros(2, 14)
    target = torch.ones(2, 14)
    valid = torch.zeros(2, 14, dtype=torch.bool)
    assert geometry_loss(predicted, target, valid).item() == 0
    valid[0, ATTRIBUTE_SLICES["area"]] = True
    valid[:, ATTRIBUTE_SLICES["bbox"]] = True
    # area: one valid entry, error 1 -> 1; bbox: 8 valid entries, error 1 -> 1; total 2
    assert geometry_loss(predicted, target, valid).item() == pytest.approx(2.0)


def test_semantic_loss_by_hand() -> None:
    a = torch.tensor([[[1.0, 0.0]]])
    assert semantic_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert semantic_loss(a, torch.tensor([[[0.0, 3.0]]])).item() == pytest.approx(1.0)
    assert semantic_loss(a, torch.tensor([[[-2.0, 0.0]]])).item() == pytest.approx(2.0)


def test_dice_scores_by_hand() -> None:
    prob = torch.tensor([[[0.9, 0.9], [0.1, 0.1]], [[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 0]]])
    assert dice_scores(prob, mask).tolist() == pytest.approx([0.5, 1.0])


def test_learning_rate_schedule() -> None:
    config = TrainConfig(variant="c2p-test-64", data=("x",), out="y", steps=100, lr=1.0, warmup_steps=10)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(100, config) == pytest.approx(config.min_lr_ratio)


def blobs(n: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for _ in range(n):
        cx, cy, rx, ry = rng.uniform(16, 48), rng.uniform(16, 48), rng.uniform(4, 14), rng.uniform(4, 14)
        masks.append((((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.float32))
    mask = torch.from_numpy(np.stack(masks))[:, None]
    image = (0.3 + 0.4 * mask + 0.05 * torch.from_numpy(rng.standard_normal(mask.shape)).float()).clamp(0, 1)
    return image.expand(-1, 3, -1, -1).contiguous(), mask


def test_flips_and_rotations_keep_geometry_true_to_the_mask() -> None:
    images, masks = blobs(16)
    geometry, valid = measure(masks[:, 0])
    config = AugmentConfig(flip_p=0.5, rotate_p=0.5)
    out_images, out_masks, out_geometry, out_valid = augment(
        images, masks, geometry, valid, config, torch.Generator().manual_seed(1)
    )
    expected, expected_valid = measure(out_masks[:, 0])
    torch.testing.assert_close(out_geometry, expected, atol=1e-5, rtol=0)
    assert torch.equal(out_valid, expected_valid)
    assert not torch.equal(out_masks, masks)  # something was augmented
    assert out_images.min() >= 0 and out_images.max() <= 1
    again = augment(images, masks, geometry, valid, config, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], out_images)


def test_letterbox_shows_a_window_of_the_square_on_black_as_the_recipe_makes_a_non_square_slice() -> None:
    images, masks = blobs(16)
    geometry, valid = measure(masks[:, 0])
    config = AugmentConfig(flip_p=0, rotate_p=0, intensity_p=0, noise_p=0, letterbox_p=1.0, letterbox_aspect=0.4)
    out_images, out_masks, out_geometry, out_valid = augment(
        images, masks, geometry, valid, config, torch.Generator().manual_seed(2)
    )
    size = images.shape[-1]
    for image, mask, original in zip(out_images, out_masks, masks, strict=True):
        rows = (image.sum((0, 2)) > 0).nonzero()[:, 0]
        columns = (image.sum((0, 1)) > 0).nonzero()[:, 0]
        kept = rows if len(rows) < size else columns  # the short axis: a window, the long one spans the square
        assert len(rows) == size or len(columns) == size
        assert 0.4 * size - 1 <= len(kept) <= size
        assert abs((kept[0] + kept[-1]) / 2 - (size - 1) / 2) <= 1  # centred on the bands
        assert original.sum() == 0 or mask.sum() > 0  # a target may be cut, never cropped away
    expected, expected_valid = measure(out_masks[:, 0])
    torch.testing.assert_close(out_geometry, expected, atol=1e-5, rtol=0)
    assert torch.equal(out_valid, expected_valid)


def write_nnunet(root: Path, name: str, n_train: int, n_test: int, seed: int) -> Path:
    folder = root / name
    images, masks = blobs(n_train + n_test, seed=seed)
    for split, offset, count in (("Tr", 0, n_train), ("Ts", n_train, n_test)):
        (folder / f"images{split}").mkdir(parents=True)
        (folder / f"labels{split}").mkdir(parents=True)
        for i in range(count):
            pixels = (images[offset + i, 0].numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"images{split}" / f"{name}_{i:03d}_0000.png")
            Image.fromarray(masks[offset + i, 0].numpy().astype(np.uint8)).save(
                folder / f"labels{split}" / f"{name}_{i:03d}.png"
            )
    meta = {"task": name, "modality": "ultrasound", "target": "nodule", "organ": "thyroid", "split": "train"}
    dataset = {"channel_names": {"0": "US"}, "labels": {"background": 0, "nodule": 1}, "numTraining": n_train}
    (folder / "dataset.json").write_text(json.dumps({**dataset, "file_ending": ".png", "c2p": meta}))
    return folder


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_nnunet(root, "Dataset001_Blobs", 16, 4, seed=1)
    write_nnunet(root, "Dataset002_Other", 16, 4, seed=2)
    return root


def config_file(tmp_path: Path, data: Path, steps: int, semantics: bool = False) -> Path:
    text = f"""
[model]
variant = "c2p-test-64"
[data]
datasets = ["{data}"]
cache_dir = "cache"
[train]
out = "run"
steps = {steps}
batch_per_dataset = 4
lr = 2e-3
warmup_steps = 5
checkpoint_every = 10
eval_every = 10
eval_images = 4
threads = 1
semantics = {str(semantics).lower()}
"""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def test_a_few_steps_lower_the_loss(tmp_path: Path, datasets: Path) -> None:
    config = load_train_config(config_file(tmp_path, datasets, steps=30))
    trainer = Trainer(config, progress=False)
    losses = [trainer.train_step()["seg"] for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_resume_continues_exactly(tmp_path: Path, datasets: Path) -> None:
    straight = Trainer(load_train_config(config_file(tmp_path / "a", datasets, steps=20)), progress=False)
    straight.run()
    config = load_train_config(config_file(tmp_path / "b", datasets, steps=20))
    Trainer(config, progress=False).run(until=10)  # as if stopped after step 10
    resumed = Trainer(config, resume=True, progress=False)
    assert resumed.step == 10
    resumed.run()
    for (name, a), b in zip(straight.network.state_dict().items(), resumed.network.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    log = [json.loads(line) for line in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21)) and "mean_dice" in log[-1]
    card = json.loads((tmp_path / "b" / "run" / "final.json").read_text())
    assert card["train"]["step"] == 20 and card["config"]["name"] == "c2p-test-64"


def test_semantic_targets_are_embedded_and_cached(tmp_path: Path, datasets: Path) -> None:
    config = load_train_config(config_file(tmp_path, datasets, steps=1, semantics=True))
    trainer = Trainer(config, progress=False)
    semantics = trainer.tasks[0].semantics.float()
    assert semantics.shape == (16, 9, 384)
    assert torch.allclose(semantics.norm(dim=-1), torch.ones(16, 9), atol=1e-2)
    assert math.isfinite(trainer.train_step()["sem"])


def test_init_starts_from_given_weights(tmp_path: Path, datasets: Path) -> None:
    first = Trainer(load_train_config(config_file(tmp_path / "a", datasets, steps=2)), progress=False)
    weights = first.run()
    path = config_file(tmp_path / "b", datasets, steps=1)
    path.write_text(path.read_text().replace('out = "run"', f'out = "run"\ninit = "{weights}"'))
    second = Trainer(load_train_config(path), progress=False)
    for (name, a), b in zip(first.network.state_dict().items(), second.network.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_config_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nvariant = "c2p-test-64"\n[data]\ndatasets = ["x"]\n[train]\nout = "o"\nstepz = 3\n')
    with pytest.raises(ValueError, match="stepz"):
        load_train_config(path)
