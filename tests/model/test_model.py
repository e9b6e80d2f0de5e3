"""Model library contracts: every adapter × decoder builds and trains, adapters start as no-ops, only the
intended parameters change, strict loading names bad keys, checkpoints round-trip."""

from __future__ import annotations

import copy

import pytest
import torch

from medsam2.config import ModelCfg
from medsam2.engine.checkpoint import atomic_save, build_model, load_model, load_sam2, model_payload
from medsam2.model.adapters import ADAPTERS
from medsam2.model.backbone import CheckpointMismatchError, build_sam2_base, release_url
from medsam2.model.decoders import DECODERS
from medsam2.model.segmenter import normalize

S = 64


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(0)
    x = normalize(torch.rand(b, 3, S, S, generator=g))
    boxes = torch.tensor([[8.0, 10, 40, 50], [20, 4, 60, 30]])[:b]
    pts = torch.tensor([[[20.0, 30], [5, 5]], [[40, 15], [60, 60]]])[:b]
    labels = torch.tensor([[1, 0], [1, 0]], dtype=torch.int32)[:b]
    return x, {"boxes": boxes, "points": pts, "point_labels": labels}


def _cfg(**kw) -> ModelCfg:
    kw.setdefault("image_size", S)
    if kw.get("decoder") == "prompt_free":
        kw.setdefault("prompt", "none")
    if kw.get("prompt") == "points":
        kw.setdefault("num_neg_points", 1)
    return ModelCfg(**kw)


def test_registries_list_the_documented_variants():
    assert ADAPTERS.names() == ["bottleneck", "decoder_only", "full", "lora"]
    assert DECODERS.names() == ["multiscale", "prompt_free", "sam2"]


@pytest.mark.parametrize("adapter", ["full", "decoder_only", "bottleneck", "lora"])
@pytest.mark.parametrize("decoder,prompt", [("sam2", "box"), ("multiscale", "points"), ("prompt_free", "none")])
def test_variant_trains_and_only_intended_params_change(adapter, decoder, prompt):
    model, _ = build_model(_cfg(adapter=adapter, decoder=decoder, prompt=prompt))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    x, kw = _inputs()
    out = model(x, **kw)
    assert out["logits"].shape == (2, 1, S, S) and out["iou_pred"].shape == (2, 1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    target = torch.zeros(2, 1, S, S)
    target[:, :, 10:40, 10:40] = 1
    torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], target).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "nothing trained"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    encoder_trunk = {n for n in trainable if n.startswith("sam.image_encoder.trunk.")}
    if adapter == "full":
        assert any(n.startswith("sam.image_encoder.") for n in changed)
    elif adapter == "decoder_only":
        assert not encoder_trunk
    elif adapter == "bottleneck":
        assert encoder_trunk and all(".mlp.down." in n or ".mlp.up." in n for n in encoder_trunk)
    elif adapter == "lora":
        assert encoder_trunk and all("lora_" in n for n in encoder_trunk)
    assert not any(n.startswith("sam.memory_") for n in trainable), "video-memory modules must stay frozen"


@pytest.mark.parametrize("adapter", ["bottleneck", "lora"])
def test_injected_adapters_start_as_a_no_op(adapter):
    base, _ = build_model(_cfg(adapter="full"), seed=3)
    adapted, _ = build_model(_cfg(adapter=adapter), seed=3)
    x, kw = _inputs()
    with torch.no_grad():
        a, b = base.eval()(x, **kw)["logits"], adapted.eval()(x, **kw)["logits"]
    torch.testing.assert_close(a, b)


def test_multiscale_decoder_starts_equal_to_stock_decoder():
    stock, _ = build_model(_cfg(decoder="sam2"), seed=1)
    multi, _ = build_model(_cfg(decoder="multiscale"), seed=1)
    multi.sam.load_state_dict(stock.sam.state_dict())
    x, kw = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(x, **kw)["logits"], multi.eval()(x, **kw)["logits"])


def test_param_counts_are_reported_and_adapters_train_fewer():
    counts = {a: build_model(_cfg(adapter=a))[0].param_count() for a in ADAPTERS.names()}
    assert counts["full"].trainable > counts["bottleneck"].trainable > counts["decoder_only"].trainable
    assert counts["lora"].trainable > counts["decoder_only"].trainable
    assert all(c.trainable <= c.total for c in counts.values())


def test_meta_format_checkpoint_loads_strictly(tmp_path):
    sam = build_sam2_base("hiera_t", "2.1", S)
    path = tmp_path / "sam2.1_random.pt"
    torch.save({"model": sam.state_dict()}, path)
    loaded, base = load_sam2("hiera_t", "2.1", S, str(path))
    assert base.source == str(path) and len(base.sha256) == 64
    for k, v in sam.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_strict_load_names_missing_and_unexpected_keys(tmp_path):
    state = build_sam2_base("hiera_t", "2.1", S).state_dict()
    state.pop("sam_mask_decoder.iou_token.weight")
    state["not_a_sam2_key.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_sam2("hiera_t", "2.1", S, str(path))
    assert "sam_mask_decoder.iou_token.weight" in str(err.value) and "not_a_sam2_key.weight" in str(err.value)


def test_sam2_0_checkpoint_into_sam2_1_model_is_an_explained_error(tmp_path):
    path = tmp_path / "sam2_0.pt"
    torch.save({"model": build_sam2_base("hiera_t", "2.0", S).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match="SAM2 vs SAM2.1"):
        load_sam2("hiera_t", "2.1", S, str(path))


def test_missing_checkpoint_and_release_names(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sam2("hiera_t", "2.1", S, str(tmp_path / "nope.pt"))
    assert release_url("sam2.1_hiera_tiny").endswith("/092824/sam2.1_hiera_tiny.pt")
    assert release_url("sam2_hiera_base_plus").endswith("/072824/sam2_hiera_base_plus.pt")
    assert release_url("my_model") is None
    # a cached release file is used without any network access
    monkeypatch.setenv("MEDSAM2_WEIGHTS_CACHE", str(tmp_path))
    torch.save({"model": build_sam2_base("hiera_t", "2.1", S).state_dict()}, tmp_path / "sam2.1_hiera_tiny.pt")
    _, base = load_sam2("hiera_t", "2.1", S, "sam2.1_hiera_tiny")
    assert base.source == "sam2.1_hiera_tiny"


@pytest.mark.parametrize("adapter,from_file", [("lora", False), ("bottleneck", True)])
def test_checkpoint_round_trip(tmp_path, adapter, from_file):
    from medsam2.config import ExperimentCfg

    ckpt = "none"
    if from_file:  # a real base file → only the trainable tensors are saved
        ckpt = str(tmp_path / "base.pt")
        torch.save({"model": build_sam2_base("hiera_t", "2.1", S).state_dict()}, ckpt)
    cfg = ExperimentCfg(model=_cfg(adapter=adapter, checkpoint=ckpt))
    model, base = build_model(cfg.model)
    with torch.no_grad():  # make the adapter non-trivial so the round trip is meaningful
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    payload = model_payload(model, cfg, base)
    assert payload["full"] is (not from_file)
    if from_file:
        assert set(payload["model"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    path = atomic_save(payload, tmp_path / "final.pt")
    loaded, cfg2 = load_model(path)
    assert cfg2 == cfg
    x, kw = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, **kw)["logits"], loaded(x, **kw)["logits"])


def test_config_rejects_inconsistent_model_settings():
    with pytest.raises(ValueError, match="prompt_free"):
        ModelCfg(decoder="prompt_free", prompt="box")
    with pytest.raises(ValueError, match="multiple of 32"):
        ModelCfg(image_size=100)
    with pytest.raises(ValueError):
        ModelCfg(adapterr="full")  # extra keys are errors
    assert copy.deepcopy(ModelCfg()) == ModelCfg()


def test_box_raster_marks_the_cells_inside_the_box():
    from medsam2.model.segmenter import box_raster

    m = box_raster(torch.tensor([[0.0, 0, 64, 32], [10, 10, 20, 20]]), (32, 32), 128)
    assert m.shape == (2, 1, 32, 32) and set(m.unique().tolist()) == {0.0, 1.0}
    assert m[0, 0, :8, :16].all() and m[0].sum() == 8 * 16  # 4 px per cell
    assert m[1, 0].nonzero().tolist() == [[y, x] for y in (2, 3, 4) for x in (2, 3, 4)]  # centres 10, 14, 18


def test_box_mask_prompt_feeds_the_box_as_a_dense_prompt():
    with pytest.raises(ValueError, match="box_mask"):
        ModelCfg(prompt="points", box_mask=True)
    model, _ = build_model(_cfg(box_mask=True))
    x, kw = _inputs()
    _, dense = model.prompt_embeddings(2, x.device, boxes=kw["boxes"])
    _, dense_moved = model.prompt_embeddings(2, x.device, boxes=kw["boxes"] + 8)
    plain, _ = build_model(_cfg())
    _, dense_plain = plain.prompt_embeddings(2, x.device, boxes=kw["boxes"])
    assert not torch.allclose(dense, dense_moved)  # the dense prompt follows the box
    assert torch.allclose(dense_plain, dense_plain[:1].expand_as(dense_plain))  # without it: one no-mask embedding
    out = model(x, boxes=kw["boxes"])
    out["logits"].mean().backward()
    assert model.sam.sam_prompt_encoder.mask_downscaling[0].weight.grad.abs().sum() > 0  # and it trains
