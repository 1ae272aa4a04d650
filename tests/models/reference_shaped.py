"""A stand-in for the reference implementation's network and test-time consensus, for the import parity test.

The reference (Yundi218/Concept-to-Pixel: network.py, train.py) is not vendored and its code is not copied:
this module is written here from the facts ../shared/C2P.md and docs/architecture.md record. What it must
share with the reference is exactly what a checkpoint carries: the state dict's names and shapes (attribute
names below are the reference's for that reason alone) and the computation in eval mode, sequence-first
attention, per-image dynamic convolutions and all. So a file it saves is what ``torch.save(model.state_dict())``
of the reference gives, and its outputs are what the reference computes from it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.network._timm import import_timm

D = 584  # token width = numbers in one dynamic kernel (64*8 + 8*8 + 8)
TEXT = 768  # token and text width
GEO_WIDTHS = (4, 1, 1, 1, 1, 2, 1, 1, 1)
GEO_NAMES = ("bbox", "area", "perimeter", "aspect_ratio", "compactness", "centroid", "eccentricity", "orientation")
GEO_NAMES += ("solidity",)


def _ln_mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Linear, LayerNorm, GELU and, given a third size, a last Linear (indices 0, 1, 3 as in the reference)."""
    layers: list[nn.Module] = [nn.Linear(sizes[0], sizes[1]), nn.LayerNorm(sizes[1]), nn.GELU()]
    if len(sizes) == 3:
        layers.append(nn.Linear(sizes[1], sizes[2]))
    return nn.Sequential(*layers)


class SeqFirstAttention(nn.Module):
    """[n, b, d] queries against [m, b, d] keys/values; q, k, v without bias, scaled after the product."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.1))

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:  # [n, b, h*d] -> [b, h, n, d]
            n, b, _ = t.shape
            return t.reshape(n, b, self.heads, -1).permute(1, 2, 0, 3)

        q, k, v = split(self.to_q(query)), split(self.to_k(key_value)), split(self.to_v(key_value))
        attention = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        out = attention @ v  # [b, h, n, d]
        b, h, n, d = out.shape
        return self.to_out(out.permute(2, 0, 1, 3).reshape(n, b, h * d))


class Mlp4(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * dim, dim))
        self.net.append(nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwoWayLayer(nn.Module):
    """Only the queries are normalised; the image reads the tokens as they came into the layer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token_norm, self.image_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_to_image_attn, self.image_to_token_attn = SeqFirstAttention(dim, 8), SeqFirstAttention(dim, 8)
        self.token_ffn_norm, self.image_ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_ffn, self.image_ffn = Mlp4(dim), Mlp4(dim)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = tokens + self.token_to_image_attn(self.token_norm(tokens), image)
        t = t + self.token_ffn(self.token_ffn_norm(t))
        i = image + self.image_to_token_attn(self.image_norm(image), tokens)
        return t, i + self.image_ffn(self.image_ffn_norm(i))


class HalfPositions(nn.Module):
    def __init__(self, dim: int, table: int = 24) -> None:
        super().__init__()
        self.pos_emb_h = nn.Parameter(torch.randn(table, dim // 2) * 0.02)
        self.pos_emb_w = nn.Parameter(torch.randn(table, dim // 2) * 0.02)

    def forward(self, h: int, w: int) -> torch.Tensor:
        grid_h = self.pos_emb_h[:h, None, :].repeat(1, w, 1)
        grid_w = self.pos_emb_w[None, :w, :].repeat(h, 1, 1)
        return torch.cat([grid_h, grid_w], dim=2).reshape(h * w, -1)


class DeepTransformer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pos_encoding = HalfPositions(dim)
        self.layers = nn.ModuleList(TwoWayLayer(dim) for _ in range(3))


class StyleContent(nn.Module):
    def __init__(self, shallow: int, deep: int) -> None:
        super().__init__()
        self.style_compress = _ln_mlp((2 * shallow, shallow))
        self.content_compress = _ln_mlp((deep, deep // 2))
        fused = shallow + deep // 2
        self.fusion_mlp = _ln_mlp((fused, fused, TEXT))

    def forward(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        flat = shallow.flatten(2)
        stats = torch.cat([flat.mean(2), torch.sqrt(flat.var(2) + 1e-6)], dim=1)
        pooled = deep.mean(dim=(2, 3))
        return self.fusion_mlp(torch.cat([self.style_compress(stats), self.content_compress(pooled)], dim=1))


class ReferenceShaped(nn.Module):
    """The reference's C2P (model 'base'), eval-mode behaviour; returns fg, bg, geo dict, SEM embeddings."""

    def __init__(self) -> None:
        super().__init__()
        timm = import_timm()
        self.bkbone = timm.create_model("convnextv2_base", pretrained=False, features_only=True)
        for level, deep, skip, out in ((5, 1024, 512, 512), (4, 512, 256, 256), (3, 256, 128, 64)):
            setattr(self, f"upconv{level}", nn.ConvTranspose2d(deep, skip, 2, stride=2))
            setattr(self, f"conv{level}_1", nn.Conv2d(2 * skip, out, 3, padding=1))
            setattr(self, f"bn{level}_1", nn.BatchNorm2d(out))
        self.geo_tokens = nn.Parameter(nn.init.xavier_uniform_(torch.empty(9, TEXT)))
        self.semantic_tokens = nn.Parameter(nn.init.xavier_uniform_(torch.empty(9, TEXT)))
        self.modality_learner = StyleContent(128, 1024)
        self.token_proj = _ln_mlp((TEXT, D))
        self.ref_proj = nn.Sequential(nn.Linear(1024, D), nn.LayerNorm(D))
        self.updated_feat_proj = nn.Conv2d(D, 1024, 1, bias=False)
        self.d2_proj = nn.Sequential(nn.Conv2d(64, D, 1), nn.GroupNorm(1, D))
        self.transformer_deep = DeepTransformer(D)
        self.geo_predictors = nn.ModuleList(_ln_mlp((D, 256, w)) for w in GEO_WIDTHS)
        self.semantic_projectors = nn.ModuleList(_ln_mlp((D, D, TEXT)) for _ in range(9))
        self.kernel_generator_fg = _ln_mlp((3 * D, 2 * D, D))
        self.kernel_generator_bg = _ln_mlp((3 * D, 2 * D, D))
        self.cross_attn_geo = SeqFirstAttention(D, 4)
        self.cross_attn_sem = SeqFirstAttention(D, 4)

    def _up(self, level: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([getattr(self, f"upconv{level}")(x), skip], dim=1)
        return F.relu(getattr(self, f"bn{level}_1")(getattr(self, f"conv{level}_1")(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        e2, e3, e4, e5 = self.bkbone(x)
        b, _, h, w = e5.shape
        sem = self.semantic_tokens[None] + self.modality_learner(e2, e5)[:, None]
        tokens = torch.cat([self.token_proj(self.geo_tokens[None].repeat(b, 1, 1)), self.token_proj(sem)], dim=1)
        image = self.ref_proj(e5.flatten(2).transpose(1, 2)) + self.transformer_deep.pos_encoding(h, w)[None]
        tokens, image = tokens.transpose(0, 1), image.transpose(0, 1)  # sequence-first from here
        for layer in self.transformer_deep.layers:
            tokens, image = layer(tokens, image)
        deep = self.updated_feat_proj(image.permute(1, 2, 0).reshape(b, D, h, w))
        d2 = self._up(3, self._up(4, self._up(5, deep, e4), e3), e2)

        geo, sem_tokens = tokens[:9], tokens[9:]  # [9, B, D] each
        geometry = {name: torch.sigmoid(self.geo_predictors[i](geo[i])) for i, name in enumerate(GEO_NAMES)}
        embeddings = torch.stack([p(sem_tokens[i]) for i, p in enumerate(self.semantic_projectors)], dim=1)

        g = self.d2_proj(d2).mean(dim=(2, 3))  # [B, D]
        z = torch.cat([self.cross_attn_geo(g[None], geo)[0], self.cross_attn_sem(g[None], sem_tokens)[0], g], dim=1)
        logits = []
        for generator in (self.kernel_generator_fg, self.kernel_generator_bg):
            kernels = generator(z)
            maps = []
            for i in range(b):  # one image at a time, as three plain convolutions
                k = kernels[i]
                y = F.relu(F.conv2d(d2[i : i + 1], k[:512].reshape(8, 64, 1, 1)))
                y = F.relu(F.conv2d(y, k[512:576].reshape(8, 8, 1, 1)))
                maps.append(F.conv2d(y, k[576:].reshape(1, 8, 1, 1)))
            up = F.interpolate(torch.cat(maps), size=x.shape[-2:], mode="bilinear", align_corners=True)
            logits.append(up)
        return logits[0], logits[1], geometry, embeddings


def mask_properties(prob: torch.Tensor) -> tuple[float, tuple[float, float]]:
    """[H, W] soft mask -> area / (H W) and the centroid (x / W, y / H) with x = 0..W-1, as the reference measures."""
    h, w = prob.shape
    mass = prob.sum()
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    cx = (xs * prob).sum() / (mass + 1e-6) / w
    cy = (ys * prob).sum() / (mass + 1e-6) / h
    return (mass / (h * w)).item(), (cx.item(), cy.item())


def reference_consensus(model: ReferenceShaped, image: torch.Tensor) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """One image [1, 3, H, W] -> (fused probability [1, 1, H, W], the three view weights, the un-flipped views'
    plain mean: what ignoring the weights would give), in float32.

    Identity, W-flip and H-flip in one batch; each view's sigmoid(fg) compared in its own frame with its own
    predicted area and centroid; w = exp(-5 (10 |dA| + ||dC||)); un-flipped, sum(w p) / (sum w + 1e-8);
    zeros where the mean predicted area < 0.001 and the fused mean < 0.005.
    """
    views = torch.cat([image, image.flip(3), image.flip(2)])
    with torch.no_grad():
        fg, _, geometry, _ = model(views)
    h, w = image.shape[-2:]
    probs = torch.sigmoid(F.interpolate(fg.float(), size=(h, w), mode="bilinear", align_corners=True))
    undo = (lambda m: m, lambda m: m.flip(3), lambda m: m.flip(2))
    fused, plain, total, weights, areas = torch.zeros(1, 1, h, w), torch.zeros(1, 1, h, w), 0.0, [], []
    for i in range(3):
        area, (cx, cy) = mask_properties(probs[i, 0])
        predicted_area = geometry["area"][i].item()
        pcx, pcy = geometry["centroid"][i].tolist()
        u = 10.0 * abs(area - predicted_area) + math.hypot(cx - pcx, cy - pcy)
        weight = math.exp(-5.0 * u)
        fused += undo[i](probs[i : i + 1]) * weight
        plain += undo[i](probs[i : i + 1]) / 3
        total += weight
        weights.append(weight)
        areas.append(predicted_area)
    fused = fused / (total + 1e-8)
    if sum(areas) / 3 < 0.001 and fused.mean() < 0.005:
        fused = torch.zeros_like(fused)
    return fused, weights, plain
