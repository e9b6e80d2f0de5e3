"""The CPU layout hooks on SAM2's mask decoder (``medsam2.model.cpu_layout``): they change where the decoder's
tensors live in memory, not its results (fp32 rounding apart), and stay out of training."""

from __future__ import annotations

import pytest
import torch

from medsam2.config import ModelCfg
from medsam2.engine.checkpoint import build_model
from medsam2.engine.predict import _one_feats
from medsam2.engine.runtime import encoder_twin
from medsam2.model import cpu_layout
from medsam2.model.decoders.stock import run_sam_decoder
from medsam2.model.segmenter import normalize

S = 128


@pytest.fixture(scope="module")
def model():
    return build_model(ModelCfg(image_size=S, decoder="sam2", prompt="box"), seed=0)[0].eval()


def _decode(model, feats, boxes):
    sparse, dense = model.prompt_embeddings(boxes.shape[0], boxes.device, boxes, None, None)
    return run_sam_decoder(model.sam, feats, sparse, dense)


def test_hooks_are_installed_once_and_leave_the_state_dict_as_sam2s(model):
    md = model.sam.sam_mask_decoder
    assert len(md.transformer._forward_pre_hooks) == 1
    assert len(md.output_upscaling[0]._forward_pre_hooks) == 1
    cpu_layout.install(md)
    assert len(md.transformer._forward_pre_hooks) == 1
    assert all(".inner." not in k for k in model.state_dict())


@pytest.mark.parametrize("batch", [1, 3])
def test_decoder_outputs_are_those_without_the_hooks(model, batch, monkeypatch):
    g = torch.Generator().manual_seed(batch)
    x = normalize(torch.rand(batch, 3, S, S, generator=g))
    boxes = torch.tensor([[10.0, 12, 90, 100], [30, 5, 120, 60], [0, 0, 128, 128]])[:batch]
    with torch.no_grad():
        twin = encoder_twin(model).encode(x)  # channels-last maps, as predict's encoder makes them
        feats = _one_feats(twin, 0) if batch == 1 else twin
        assert feats["high_res"][0].is_contiguous(memory_format=torch.channels_last)
        hooked = _decode(model, feats, boxes)
        with monkeypatch.context() as m:  # switched off: SAM2's decoder on the same features, as it is
            m.setattr(cpu_layout, "_active", lambda x: False)
            plain = _decode(model, feats, boxes)
    # the convolutions sum in another order by layout: ~1e-7 on logits of magnitude ~0.5
    torch.testing.assert_close(hooked[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(hooked[1], plain[1], rtol=0, atol=1e-6)
    assert not torch.equal(hooked[0], torch.zeros_like(hooked[0]))


def test_hooks_stay_out_of_training(model):
    x = torch.randn(1, 256, 8, 8).requires_grad_()
    with torch.enable_grad():
        assert cpu_layout._upscale_input(None, (x,)) is None
        assert cpu_layout._transformer_inputs(None, (x, x, torch.randn(1, 3, 256))) is None
    with torch.no_grad():
        emb, pe, _ = cpu_layout._transformer_inputs(None, (x, x, torch.randn(1, 3, 256)))
        assert emb.is_contiguous(memory_format=torch.channels_last) and torch.equal(emb, x)


def test_canonical_channels_last_restrides_without_copying():
    x = torch.randn(1, 4 * 4, 8).transpose(1, 2).view(1, 8, 4, 4)  # what the decoder's transformer hands on
    assert x.is_contiguous(memory_format=torch.channels_last) and x.stride() != (128, 1, 32, 8)
    y = cpu_layout.canonical_channels_last(x)
    assert y.stride() == (128, 1, 32, 8) and y.data_ptr() == x.data_ptr() and torch.equal(x, y)
    nchw = torch.randn(2, 8, 4, 4)
    assert cpu_layout.canonical_channels_last(nchw) is nchw
