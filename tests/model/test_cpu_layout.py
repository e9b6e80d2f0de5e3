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


@pytest.mark.parametrize("k,hw", [(2, (8, 8)), (2, (7, 9)), (3, (9, 10))])
def test_strided_max_pool_equals_maxpool2d_on_strided_inputs(k, hw):
    g = torch.Generator().manual_seed(k)
    qkv = torch.randn(3, hw[0] * hw[1], 3, 16, generator=g)  # q as Hiera pools it: a slice of qkv, viewed NCHW
    q = qkv.unbind(2)[0].reshape(3, *hw, 16).permute(0, 3, 1, 2)
    q[0, 2, 1, 1] = float("nan")
    ref = torch.nn.MaxPool2d(k, k)(q)
    out = cpu_layout.StridedMaxPool(k)(q)
    assert out.shape == ref.shape and torch.equal(out.nan_to_num(-9), ref.nan_to_num(-9))
    assert out.isnan().sum() == ref.isnan().sum() == 1


def test_twins_pool_in_place_with_the_same_features(model):
    assert cpu_layout.strided_max_pools(torch.nn.MaxPool2d(2, 2, padding=1)) == 0  # not reproduced: kept
    twin = encoder_twin(model)
    pools = [m for m in twin.modules() if isinstance(m, cpu_layout.StridedMaxPool)]
    assert pools and not any(isinstance(m, torch.nn.MaxPool2d) for m in twin.modules())
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())  # the model itself is untouched
    x = normalize(torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ours = twin.encode(x)
        for parent in list(twin.modules()):
            for name, child in parent.named_children():
                if isinstance(child, cpu_layout.StridedMaxPool):
                    setattr(parent, name, torch.nn.MaxPool2d(child.k, child.k))
        plain = twin.encode(x)
    assert torch.equal(ours["image_embed"], plain["image_embed"])
    assert all(torch.equal(a, b) for a, b in zip(ours["high_res"], plain["high_res"], strict=True))
