"""The serving graph: the C2P network with the consensus step around it, one artifact per model version.

It calls only the network's public ``segment``; the network knows nothing of export or consensus.
"""

from __future__ import annotations

import torch
from torch import nn

from models.consensus import Consensus, ConsensusOutput, make_views
from models.network import C2P

INPUT_NAME = "image"


class ServingGraph(nn.Module):
    """image [B, 3, S, S] (normalised) -> ConsensusOutput, with the 3 views run as one batch of 3B.

    The consensus rule is the network's own (``C2PConfig.consensus``: an imported reference model is fused as
    its code fuses it) unless ``weighting`` says otherwise.
    """

    def __init__(self, network: C2P, weighting: str | None = None) -> None:
        super().__init__()
        self.network = network
        self.consensus = Consensus(network.config.consensus if weighting is None else weighting)

    def forward(self, image: torch.Tensor) -> ConsensusOutput:
        segmentation = self.network.segment(make_views(image))
        return self.consensus(segmentation.fg, segmentation.geometry, segmentation.concept)
