"""``Segmenter``: an unforked SAM2 model + a registered decoder + a prompt mode, as one ``nn.Module``.

Image path (as in ``SAM2ImagePredictor``): ``forward_image`` → ``_prepare_backbone_features`` → add
``no_mem_embed`` → prompt encoder → decoder. Inputs are SAM's normalised images; prompts are in input-pixel
coordinates of the S×S model input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from medsam2.config import ModelCfg
from medsam2.model import cpu_layout
from medsam2.model.adapters import ADAPTERS
from medsam2.model.backbone import BaseWeights, build_sam2_base
from medsam2.model.decoders import DECODERS
from medsam2.model.priors import PriorResidual, zero_init_correction

log = logging.getLogger(__name__)

IMAGE_PATH_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


def _iou_head_in_fp32(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of SAM's IoU head: under autocast, its output is recomputed in fp32. In bf16 a predicted
    IoU in [0.5, 1) has 128 possible values (steps of 1/256), so most images of a narrow-range model tie, which
    blurs the ranking the failure flags and the ``pred_iou`` acquisition score read. What is recomputed is a
    3-layer MLP on one (B,256) token. Outside autocast (fp32, export) the output stands."""
    x = args[0]
    if not torch.is_autocast_enabled(x.device.type):
        return None
    with torch.autocast(x.device.type, enabled=False):
        return type(module).forward(module, x.float())


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int


class Segmenter(nn.Module):
    """SAM2 + decoder. ``forward(images, boxes=None, points=None, point_labels=None)``.

    Args:
        images: (B,3,S,S) float, normalised with ImageNet mean/std (see :func:`normalize`).
        boxes: (B,4) float, x0,y0,x1,y1 in [0,S] pixel coords; used when ``prompt == "box"``.
        points: (B,N,2) float x,y in [0,S]; point_labels: (B,N) int (1 positive, 0 negative, -1 padding).
    Returns:
        dict(logits=(B,1,S,S) pre-sigmoid float, iou_pred=(B,1) predicted IoU in [0,1]). With ``model.box_prior``
        the logits are the box prior's log-odds plus the decoder's output (zero at init) (``medsam2.model.priors``).
    """

    def __init__(self, sam: nn.Module, cfg: ModelCfg) -> None:
        super().__init__()
        self.sam = sam
        self.cfg = cfg
        self.decoder = DECODERS.create(cfg.decoder, sam, cfg)
        self.prior = PriorResidual(cfg.box_prior) if cfg.box_prior != "none" else None
        sam.sam_mask_decoder.iou_prediction_head.register_forward_hook(_iou_head_in_fp32)
        cpu_layout.install(sam.sam_mask_decoder)

    @property
    def image_size(self) -> int:
        return int(self.sam.image_size)

    def encode(self, images: torch.Tensor) -> dict:
        """(B,3,S,S) → {"image_embed": (B,256,S/16,S/16), "high_res": [(B,32,S/4,S/4), (B,64,S/8,S/8)]}."""
        sam = self.sam
        backbone_out = sam.forward_image(images)
        _, vision_feats, _, feat_sizes = sam._prepare_backbone_features(backbone_out)
        if sam.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + sam.no_mem_embed
        b = images.shape[0]
        maps = [f.permute(1, 2, 0).reshape(b, -1, *hw) for f, hw in zip(vision_feats, feat_sizes, strict=True)]
        return {"image_embed": maps[-1], "high_res": maps[:-1]}

    def prompt_embeddings(self, batch: int, device, boxes=None, points=None, point_labels=None):
        """Sparse (B,T,256) and dense (B,256,S/16,S/16) prompt embeddings for the configured prompt mode."""
        coords, labels = [], []
        if self.cfg.prompt == "box":
            if boxes is None:
                raise ValueError("model.prompt=box needs boxes (B,4)")
            coords.append(boxes.reshape(-1, 2, 2).float())
            labels.append(torch.tensor([[2, 3]], dtype=torch.int32, device=device).expand(batch, -1))
        elif self.cfg.prompt == "points":
            if points is None or point_labels is None:
                raise ValueError("model.prompt=points needs points (B,N,2) and point_labels (B,N)")
            coords.append(points.float())
            labels.append(point_labels.int())
        if not coords:  # no prompt: one padding point per image (label -1), as SAM2Base does
            coords = [torch.zeros(batch, 1, 2, device=device)]
            labels = [-torch.ones(batch, 1, dtype=torch.int32, device=device)]
        masks = box_raster(boxes, self.sam.sam_prompt_encoder.mask_input_size, self.image_size) \
            if self.cfg.box_mask else None
        return self.sam.sam_prompt_encoder(
            points=(torch.cat(coords, 1), torch.cat(labels, 1)), boxes=None, masks=masks
        )

    def forward(self, images, boxes=None, points=None, point_labels=None) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(images), images, boxes, points, point_labels)

    def decode(self, feats: dict, images, boxes=None, points=None, point_labels=None) -> dict[str, torch.Tensor]:
        """Prompts + :meth:`encode`'s features → ``forward``'s output: the part to re-run for another prompt on
        an already-encoded image (``images`` (B,3,S,S) is read by the decoders that refine at full resolution)."""
        sparse, dense = self.prompt_embeddings(images.shape[0], images.device, boxes, points, point_labels)
        logits, iou_pred = self.decoder(self.sam, feats, sparse, dense, images)
        if self.prior is not None:
            logits = self.prior(logits, boxes)
        return {"logits": logits, "iou_pred": iou_pred}

    def param_count(self) -> ParamCount:
        params = list(self.parameters())
        return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: parameters with ``requires_grad`` (adapters, decoder, heads)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k in names}


def box_raster(boxes: torch.Tensor, size: tuple[int, int], image_size: int) -> torch.Tensor:
    """(B,4) x0,y0,x1,y1 in [0,S] → (B,1,h,w) float mask: 1 where a cell's centre lies in the box, else 0."""
    h, w = size
    ys = (torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5) * (image_size / h)
    xs = (torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5) * (image_size / w)
    b = boxes.float()
    inside_y = (ys[None, :] >= b[:, 1:2]) & (ys[None, :] <= b[:, 3:4])  # (B,h)
    inside_x = (xs[None, :] >= b[:, 0:1]) & (xs[None, :] <= b[:, 2:3])  # (B,w)
    return (inside_y[:, :, None] & inside_x[:, None, :]).float().unsqueeze(1)


class UnreadPositions(nn.Module):
    """Stand-in for the FPN neck's sine position encoding in an encode-only copy of a :class:`Segmenter`
    (:func:`for_encoding`): ``Segmenter.encode`` discards ``vision_pos_enc`` (the decoders read the prompt
    encoder's dense PE), yet SAM2's neck builds it for every level by ``repeat``-ing a cached (256,S/4,S/4)
    float32 map and casting it to the features' dtype. Returns a zero (B,C,H,W) view with stride 0: no memory,
    no work. Removing that work took a bf16 hiera-t encoder at 1024 px from 0.975 to 0.889 s (2 AMX cores,
    same process, 2026-12-03), features bit-identical."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(()).expand(x.shape[0], self.channels, *x.shape[-2:])


def for_encoding(model: nn.Module) -> nn.Module:
    """In place, for an inference copy that only runs :meth:`Segmenter.encode` (``engine.runtime.encoder_twin``,
    fp32 or bf16):

    - the neck's unread position encoding becomes :class:`UnreadPositions`;
    - Hiera's position embedding is computed once per feature size and kept: SAM2 recomputes it on every
      forward, a bicubic resize of its (1,C,7,7) table to (1,C,S/4,S/4), which in bf16 took 28-57 ms of a
      0.56 s hiera-t encoder at 1024 px (2 cores, 2026-12-03). It depends on the weights only, and the twin's
      weights never change (a new twin is made when the model's do).

    A module that is not a :class:`Segmenter` is returned as it is. Never apply this to a model that trains or
    runs SAM2's video memory (which reads those positions)."""
    if isinstance(model, Segmenter):
        neck = model.sam.image_encoder.neck
        neck.position_encoding = UnreadPositions(neck.d_model)
        trunk = model.sam.image_encoder.trunk
        trunk._get_pos_embed = _kept(trunk._get_pos_embed)
    return model


def _kept(fn):
    """``fn(hw)`` computed once per ``hw`` (an instance attribute over SAM2's method; the class is unchanged)."""
    kept: dict[tuple[int, int], torch.Tensor] = {}

    def get(hw) -> torch.Tensor:
        key = (int(hw[0]), int(hw[1]))
        if key not in kept:
            kept[key] = fn(hw)
        return kept[key]

    return get


def normalize(images_01: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) float in [0,1] → SAM's ImageNet-normalised input."""
    mean = images_01.new_tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = images_01.new_tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (images_01 - mean) / std


def build_segmenter(
    cfg: ModelCfg, *, seed: int = 0, sam: nn.Module | None = None, base: BaseWeights | None = None
) -> tuple[Segmenter, BaseWeights]:
    """Wrap a SAM2 (``sam``, its weights already loaded, with their identity ``base``), then apply the
    adapter/freeze policy. Without ``sam``: a random-init SAM2 seeded by ``seed`` (``cfg.checkpoint`` must be
    ``none``; weights from a file are ``engine.checkpoint.build_model``'s job, this layer knows no sources)."""
    if sam is None:
        if cfg.checkpoint not in ("none", "", None):
            raise ValueError(f"model.checkpoint={cfg.checkpoint!r}: build it with "
                             "medsam2.engine.checkpoint.build_model, which loads the weights")
        torch.manual_seed(seed)
        sam = build_sam2_base(cfg.backbone, cfg.sam2_version, cfg.image_size)
        log.warning("model.checkpoint=none: SAM2 %s is RANDOMLY INITIALISED (no pretrained weights)", cfg.backbone)
        base = BaseWeights("none", "none", "none")
    assert base is not None, "base: the identity of the weights in sam"
    # one mask token is trained and served: SAM's eval-time switch to another (untrained) token when token 0
    # looks unstable would make evaluation differ from training
    sam.sam_mask_decoder.dynamic_multimask_via_stability = False
    model = Segmenter(sam, cfg)
    if model.prior is not None:  # the decoder's output is a correction of the prior: zero at step 0
        zero_init_correction(sam)
    ADAPTERS.create(cfg.adapter, model, cfg)
    for p in model.decoder.parameters():  # the decoder's own modules always train
        p.requires_grad_(True)
    for name, p in sam.named_parameters():  # video-memory modules train only when the memory does (model.memory)
        if not name.startswith(IMAGE_PATH_PREFIXES):
            p.requires_grad_(cfg.memory)
    return model, base
