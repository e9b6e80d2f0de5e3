"""Decoder registry. A decoder is an ``nn.Module`` built by ``DECODERS.create(name, sam, cfg)`` with

``forward(sam, feats, sparse, dense, images) -> (logits (B,1,S,S) float, iou_pred (B,1) in [0,1])``

where ``feats`` = {"image_embed": (B,256,S/16,S/16), "high_res": [(B,32,S/4,S/4), (B,64,S/8,S/8)]},
``sparse`` (B,T,256) / ``dense`` (B,256,S/16,S/16) are prompt embeddings and ``images`` (B,3,S,S) the normalised
input. Logits are pre-sigmoid; the mask is ``logits > 0``.
"""

from medsam2.model.decoders import multiscale, prompt_free, stock  # noqa: E402,F401  (registers the variants)
from medsam2.model.decoders.base import DECODERS

__all__ = ["DECODERS"]
