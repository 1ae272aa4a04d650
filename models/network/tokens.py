"""The shared concept tokens and the SCFM modality vector that conditions the semantic ones.

GEO and SEM tokens are shared by every dataset; what tells a colonoscopy frame from a CT slice is the
modality vector, computed from the image's low-level style (E2 statistics) and high-level content
(pooled E5), and added to the SEM tokens only: semantics depend on the modality, geometry does not.
"""

from __future__ import annotations

import torch
from torch import nn

from models.network.layers import dense, mlp


class ModalityVector(nn.Module):
    """SCFM: style = per-channel mean and std of E2, content = global pool of E5, fused by an MLP.

    Ours compresses style and content to token_dim/2 each; the reference layout to C2 and C5/2, with a LayerNorm
    in every MLP and std = sqrt(var + 1e-6) (``style_eps``; 0 keeps torch's std).
    """

    def __init__(
        self,
        e2_channels: int,
        e5_channels: int,
        token_dim: int,
        widths: tuple[int, int] | None = None,
        norm: bool = False,
        style_eps: float = 0.0,
    ) -> None:
        super().__init__()
        style, content = widths or (token_dim // 2, token_dim // 2)
        self.style_eps = style_eps
        self.style = dense(2 * e2_channels, style, norm)
        self.content = dense(e5_channels, content, norm)
        self.fuse = mlp(style + content, style + content, token_dim, norm)

    def forward(self, e2: torch.Tensor, e5: torch.Tensor) -> torch.Tensor:
        flat = e2.flatten(2)
        std = flat.std(-1) if self.style_eps == 0 else (flat.var(-1) + self.style_eps).sqrt()
        style = torch.cat([flat.mean(-1), std], dim=-1)
        content = e5.flatten(2).mean(-1)
        return self.fuse(torch.cat([self.style(style), self.content(content)], dim=-1))


class ConceptTokens(nn.Module):
    """9 GEO + 9 SEM learnable tokens, projected to the interaction width D by one shared projection.

    ``scfm_widths``, ``scfm_norm`` and ``style_eps`` shape the modality vector (``ModalityVector``).
    """

    def __init__(
        self,
        num_geo: int,
        num_sem: int,
        token_dim: int,
        dim: int,
        geo_noise: float,
        e2_channels: int,
        e5_channels: int,
        scfm_widths: tuple[int, int] | None = None,
        scfm_norm: bool = False,
        style_eps: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_geo = num_geo
        self.geo_noise = geo_noise
        self.geo = nn.Parameter(torch.empty(num_geo, token_dim))
        self.sem = nn.Parameter(torch.empty(num_sem, token_dim))
        nn.init.xavier_uniform_(self.geo)
        nn.init.xavier_uniform_(self.sem)
        self.modality = ModalityVector(e2_channels, e5_channels, token_dim, scfm_widths, scfm_norm, style_eps)
        self.project = dense(token_dim, dim, norm=True)

    def forward(self, e2: torch.Tensor, e5: torch.Tensor) -> torch.Tensor:
        """Tokens [B, num_geo + num_sem, D]: GEO first, then SEM."""
        batch = e2.shape[0]
        geo = self.geo.unsqueeze(0).expand(batch, -1, -1)
        if self.training and self.geo_noise > 0:
            geo = geo + self.geo_noise * torch.randn_like(geo)
        sem = self.sem.unsqueeze(0) + self.modality(e2, e5).unsqueeze(1)
        return self.project(torch.cat([geo, sem], dim=1))
