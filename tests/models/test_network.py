from __future__ import annotations

import math

import pytest
import torch

from models.network.head import GeoHeads, apply_dynamic_kernels, pooled_group_norm
from models.registry import VARIANTS, build_c2p
from tests.conftest import seeded_network


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_builds_and_segments(variant: str) -> None:
    """timm's registry habit: every config builds, runs, and gives finite outputs of the right shape."""
    torch.manual_seed(0)
    network = build_c2p(variant).eval()
    size = network.config.input_size
    with torch.inference_mode():
        out = network.segment(torch.randn(1, 3, size, size))
    assert out.fg.shape == out.bg.shape == (1, 1, size, size)
    assert out.geometry.shape == (1, 14)
    assert torch.isfinite(out.fg).all() and torch.isfinite(out.bg).all()
    assert ((out.geometry >= 0) & (out.geometry <= 1)).all()


def test_reference_size_is_about_141m_parameters() -> None:
    """C2P.md: about 141M parameters; ours differ only by the 384-d text heads (paper: 768-d)."""
    network = build_c2p("c2p-base-384")
    count = sum(p.numel() for p in network.parameters())
    text_gap = 9 * network.config.dim * (768 - network.config.text_dim)
    assert abs(count + text_gap - 141e6) < 1.5e6


def test_the_reference_codes_network_is_141m_parameters() -> None:
    """c2p-reference-base-384 is the reference's network.py itself (768-d text heads): C2P.md's about 141M."""
    network = build_c2p("c2p-reference-base-384")
    assert abs(sum(p.numel() for p in network.parameters()) - 141e6) < 0.1e6


def test_pooled_group_norm_equals_the_pooled_map() -> None:
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(1, 32)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 32, 24, 20) * 3 + 1
    torch.testing.assert_close(pooled_group_norm(x, norm), norm(x).mean(dim=(2, 3)), atol=1e-5, rtol=0)


def test_one_orientation_value_leaves_as_two_columns() -> None:
    """GEO heads with the reference's widths still give the 14 columns, orientation converted in place."""
    torch.manual_seed(0)
    heads = GeoHeads(16, 8, (4, 1, 1, 1, 1, 2, 1, 1, 1), angle_column=11).eval()
    tokens = torch.randn(2, 9, 16)
    out = heads(tokens)
    assert out.shape == (2, 14)
    turn = math.tau * torch.sigmoid(heads.heads[7](tokens[:, 7]))  # 2πo
    torch.testing.assert_close(out[:, 11:13], torch.cat([1 - torch.sin(turn), 1 - torch.cos(turn)], dim=-1) / 2)
    assert torch.equal(out[:, 13], torch.sigmoid(heads.heads[8](tokens[:, 8]))[:, 0])


def test_training_forward_gives_every_loss_input_and_gradients() -> None:
    network = seeded_network().train()
    out = network(torch.randn(2, 3, 64, 64))
    assert out["sem"].shape == (2, 9, network.config.text_dim)
    loss = out["fg"].mean() + out["bg"].mean() + out["geometry"].mean() + out["sem"].mean()
    loss.backward()
    missing = [n for n, p in network.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_geo_token_noise_only_in_training() -> None:
    network = seeded_network()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first, second = network.segment(image), network.segment(image)
    assert torch.equal(first.fg, second.fg)


def test_dynamic_kernels_batched_equal_a_per_sample_loop() -> None:
    torch.manual_seed(0)
    b, c, h, w, hidden, k = 5, 64, 16, 12, 8, 2
    features = torch.randn(b, c, h, w)
    kernels = torch.randn(b, k, c * hidden + hidden * hidden + hidden)
    batched = apply_dynamic_kernels(features, kernels, hidden)
    for i in range(b):
        for j in range(k):
            kernel = kernels[i, j]
            w1 = kernel[: c * hidden].reshape(hidden, c, 1, 1)
            w2 = kernel[c * hidden : c * hidden + hidden * hidden].reshape(hidden, hidden, 1, 1)
            w3 = kernel[c * hidden + hidden * hidden :].reshape(1, hidden, 1, 1)
            x = torch.relu(torch.nn.functional.conv2d(features[i : i + 1], w1))
            x = torch.relu(torch.nn.functional.conv2d(x, w2))
            expected = torch.nn.functional.conv2d(x, w3)[0, 0]
            torch.testing.assert_close(batched[i, j], expected, atol=1e-4, rtol=1e-4)


def test_dynamic_kernels_are_three_matmuls_whatever_the_batch() -> None:
    """The per-image kernels must not turn into a Python loop: count bmm calls at batch 1 and 16."""
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for batch in (1, 16):
        features, kernels = torch.randn(batch, 64, 16, 16), torch.randn(batch, 2, 584)
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            apply_dynamic_kernels(features, kernels, 8)
        counts.append(sum(e.count for e in prof.key_averages() if e.key == "aten::bmm"))
    assert counts == [3, 3]


def test_backbone_loads_a_local_timm_classifier_file(tmp_path) -> None:
    """Optional local weights: a timm classifier checkpoint (as downloaded by hand) loads strictly."""
    from safetensors.torch import save_file

    from models.network._timm import import_timm

    timm = import_timm()
    torch.manual_seed(1)
    classifier = timm.create_model("convnextv2_atto", pretrained=False)
    path = tmp_path / "atto.safetensors"
    save_file(classifier.state_dict(), str(path))
    network = build_c2p("c2p-test-64", backbone_weights=str(path))
    torch.testing.assert_close(network.backbone.body.stem_0.weight, classifier.stem[0].weight)
    save_file({"stem.0.weight": torch.zeros(1)}, str(path))
    with pytest.raises(RuntimeError):
        build_c2p("c2p-test-64", backbone_weights=str(path))
