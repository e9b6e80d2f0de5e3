"""The CPU bf16 inference path: chunked attention, the model's bf16 twin, and the compiled encoder with its
eager fallback. Speed is measured in benchmarks/cpu_infer.py, not here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsam2.config import ModelCfg
from medsam2.engine import cpu_linear, runtime
from medsam2.engine.checkpoint import build_model
from medsam2.engine.cpu_attention import ChunkedCpuAttention, chunked_attention
from medsam2.engine.predict import TorchEngine, _Encode, predict
from medsam2.metrics import segmentation_metrics


def _qkv(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("shape", [(2, 3, 300, 16), (5, 1, 49, 24), (1, 2, 256, 8)])
def test_chunked_attention_equals_sdpa(shape):
    """300 queries: one full chunk of 256 and a partial one; 49 and 256: a single chunk."""
    q, k, v = _qkv(shape)
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(chunked_attention(q, k, v), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_attention(q, k, v, chunk=7), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_attention(q, k, v, scale=0.3),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    err = (chunked_attention(qb, kb, vb).float() - ref).norm() / ref.norm()
    assert err < 0.01  # bf16 softmax: measured 0.004-0.005 on Hiera shapes


def test_the_mode_takes_only_the_calls_it_covers():
    q, k, v = _qkv((1, 2, 300, 16), torch.bfloat16)
    with torch.no_grad(), ChunkedCpuAttention():
        got = F.scaled_dot_product_attention(q, k, v)
        kw = F.scaled_dot_product_attention(query=q, key=k, value=v)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(300, 300, dtype=torch.bool))
        fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert torch.equal(got, chunked_attention(q, k, v)) and torch.equal(kw, got)
    with torch.no_grad():
        assert torch.equal(masked, F.scaled_dot_product_attention(q, k, v))  # PyTorch's own kernel ran
        assert torch.equal(fp32, F.scaled_dot_product_attention(q.float(), k.float(), v.float()))
    qg = q.clone().requires_grad_()
    with ChunkedCpuAttention():  # training: PyTorch's kernel, and the gradient flows
        F.scaled_dot_product_attention(qg, k, v).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad.float()).all()


def _tiny():
    model, _ = build_model(ModelCfg(image_size=64, prompt="box"))
    model.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the init, so the masks are not all alike
        for p in model.sam.sam_mask_decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_bf16_twin_is_cached_until_the_weights_change():
    model = _tiny()
    twin = runtime.bf16_twin(model)
    assert runtime.bf16_twin(model) is twin
    assert next(twin.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in twin.parameters())
    with torch.no_grad():
        next(model.sam.image_encoder.parameters()).add_(1.0)  # an optimiser step, in place
    fresh = runtime.bf16_twin(model)
    assert fresh is not twin
    a, b = next(model.sam.image_encoder.parameters()), next(fresh.sam.image_encoder.parameters())
    torch.testing.assert_close(b.float(), a, atol=0.05, rtol=0.01)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    assert runtime.bf16_twin(model) is not fresh


def test_fp32_twin_shares_the_weights_and_encodes_as_the_model():
    """The fp32 twin holds no second copy of the weights (only its convolutions, channels-last), follows the
    model's weight changes, and gives the model's own features; the model keeps its layout and gradients."""
    model = _tiny()
    twin = runtime.encoder_twin(model)
    assert runtime.encoder_twin(model) is twin and runtime.bf16_twin(model) is not twin
    block = model.sam.image_encoder.trunk.blocks[0].attn.qkv.weight
    tblock = twin.sam.image_encoder.trunk.blocks[0]
    assert isinstance(tblock.attn.qkv, cpu_linear.OnednnLinear) and tblock.mlp.layers[0].post == "gelu"
    assert tblock.attn.qkv.linear.weight is block and block.requires_grad  # wrapped, not copied
    assert type(model.sam.image_encoder.trunk.blocks[0].attn.qkv) is torch.nn.Linear
    conv = model.sam.image_encoder.trunk.patch_embed.proj.weight
    tconv = twin.sam.image_encoder.trunk.patch_embed.proj.weight
    assert conv.is_contiguous() and tconv.is_contiguous(memory_format=torch.channels_last) and conv.requires_grad
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = twin.encode(x), model.encode(x)
    for a, b in zip([got["image_embed"], *got["high_res"]], [want["image_embed"], *want["high_res"]], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        conv.mul_(2.0)  # an optimiser step on a weight the twin copied
    assert runtime.encoder_twin(model) is not twin


def test_onednn_linear_is_the_float_linear_with_bias_and_gelu_fused():
    """OnednnLinear (the encoder twins' Linears): the same fp32 result as nn.Linear (+ exact GELU) to 1e-5, bf16
    to bf16 rounding, any leading dims; a call that needs a gradient runs PyTorch's own Linear and gets one."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 192)
    x = torch.randn(2, 5, 7, 96)
    for post in ("none", "gelu"):
        m = cpu_linear.OnednnLinear(lin, post)
        want = lin(x) if post == "none" else F.gelu(lin(x))
        with torch.no_grad():
            got = m(x)
            torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
            b16 = cpu_linear.OnednnLinear(copy.deepcopy(lin).bfloat16(), post)(x.bfloat16())
        assert got.shape == (2, 5, 7, 192) and b16.dtype == torch.bfloat16
        torch.testing.assert_close(b16.float(), want.detach(), atol=0.05, rtol=0.02)
        m(x).sum().backward()
        assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
        lin.weight.grad = None
    with pytest.raises(ValueError, match="post"):
        cpu_linear.OnednnLinear(lin, "relu")


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


def test_the_twin_encodes_as_a_plain_bf16_copy_and_leaves_the_model_whole():
    """The twin skips the neck's unread position encoding and holds channels-last convolutions: its features
    must be a plain bf16 copy's, and the model itself (which trains and runs SAM2's memory) keeps its positions."""

    from medsam2.model.segmenter import UnreadPositions

    model = _tiny()
    twin = runtime.bf16_twin(model)
    plain = copy.deepcopy(model).to(torch.bfloat16).eval()
    assert isinstance(twin.sam.image_encoder.neck.position_encoding, UnreadPositions)
    assert not isinstance(model.sam.image_encoder.neck.position_encoding, UnreadPositions)
    patch = twin.sam.image_encoder.trunk.patch_embed.proj.weight  # 7x7: its layout shows in the strides
    assert patch.is_contiguous(memory_format=torch.channels_last) and not patch.is_contiguous()
    x = torch.randn(2, 3, 64, 64).bfloat16()
    with torch.no_grad(), ChunkedCpuAttention():
        got, want, ref = twin.encode(x), plain.encode(x), model.encode(x.float())
    # its Linears run oneDNN's with the GELU on the fp32 accumulator (a plain copy rounds to bf16 first): not
    # bit-equal to the plain copy, but as close to fp32 as it is
    for a, b, r in zip(*([f["image_embed"], *f["high_res"]] for f in (got, want, ref)), strict=True):
        assert a.shape == b.shape == r.shape
        torch.testing.assert_close(a.float(), b.float(), atol=6e-2, rtol=6e-2)
        assert _rel(a, r) <= 1.1 * _rel(b, r) + 1e-3, (_rel(a, r), _rel(b, r))
    pos = twin.sam.image_encoder(x)["vision_pos_enc"][0]
    assert pos.shape == (2, 256, 16, 16) and not pos.any() and pos.stride() == (0, 0, 0, 0)


def test_bf16_prediction_runs_the_twin_and_matches_fp32(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    model = _tiny()
    img = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    box = np.array([10, 8, 70, 60], np.float32)
    fp32 = predict(model, [img], boxes=[box], precision="fp32")[0]
    seen = []
    hook = runtime.bf16_twin(model).sam.image_encoder.trunk.register_forward_hook(
        lambda m, i, o: seen.append(o[-1].dtype))
    bf16 = predict(model, [img], boxes=[box], precision="bf16")[0]
    hook.remove()
    assert seen == [torch.bfloat16]  # the twin's Hiera trunk ran, in bf16
    assert segmentation_metrics(bf16.mask, fp32.mask)["dice"] > 0.95 and abs(bf16.iou_pred - fp32.iou_pred) < 0.05


@pytest.mark.slow
def test_compiled_engine_matches_eager_and_reports_its_compile_time():
    model = _tiny()
    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    box = np.array([8, 8, 50, 56], np.float32)
    eager = predict(model, [img], boxes=[box], precision="fp32")[0]
    engine = TorchEngine(model, compile=True)
    got = predict(engine, [img], boxes=[box], precision="fp32")[0]
    c = engine.compiled["fp32"]
    assert c.error is None and c.compile_s > 0
    np.testing.assert_allclose(got.prob, eager.prob, atol=1e-4)


def test_a_failing_compile_falls_back_to_eager(caplog):
    """A mock: an inductor failure (no C++ compiler, an op it cannot lower) cannot be produced on this host, so
    the compiled callable is replaced by one that raises as inductor would."""
    model = _tiny()
    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    box = np.array([8, 8, 50, 56], np.float32)
    eager = predict(model, [img], boxes=[box], precision="fp32")[0]
    engine = TorchEngine(model, compile=True)
    compiled = runtime.InferenceCompiled(_Encode(runtime.encoder_twin(model)))  # what fp32 on CPU encodes with

    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: C++ compile error")

    compiled.compiled = broken
    engine.compiled["fp32"] = compiled
    with caplog.at_level("WARNING"):
        got = predict(engine, [img], boxes=[box], precision="fp32")
        again = predict(engine, [img], boxes=[box], precision="fp32")
    assert compiled.error.startswith("RuntimeError: InductorError") and "predicting eager" in caplog.text
    assert engine.compiled["fp32"] is compiled  # not recompiled on the next call
    np.testing.assert_array_equal(got[0].prob, eager.prob)
    np.testing.assert_array_equal(again[0].prob, eager.prob)


def test_a_bf16_mask_does_not_depend_on_what_it_was_batched_with(monkeypatch):
    """The served endpoint predicts a request's images as one batch, the CLI one file at a time: the same
    image and box must give the same mask either way (bf16 kernels round differently by memory layout)."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    model = _tiny()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ba, bb = np.array([10, 12, 80, 70], np.float32), np.array([5, 8, 40, 50], np.float32)
    both = predict(model, [a, b], boxes=[ba, bb], precision="bf16")
    alone = [predict(model, [a], boxes=[ba], precision="bf16")[0], predict(model, [b], boxes=[bb], precision="bf16")[0]]
    for x, y in zip(both, alone, strict=True):
        np.testing.assert_array_equal(x.prob, y.prob)


@pytest.mark.parametrize("amx", [False, True])
def test_the_chunked_attention_runs_only_where_it_pays(monkeypatch, amx):
    """Chunked on AVX-512 BF16 without AMX (faster there); PyTorch's flash kernel where AMX is (faster there)."""
    from medsam2.engine import cpu_attention

    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: amx)
    calls = []
    real = cpu_attention.chunked_attention
    monkeypatch.setattr(cpu_attention, "chunked_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine = TorchEngine(_tiny())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = engine.encode(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(feats["image_embed"].float()).all()
    assert bool(calls) is (not amx)


def test_int8_prediction_runs_int8_linears_and_matches_fp32():
    """precision int8: the encoder runs on the int8 twin (the image encoder's Linears as Int8Linear, each
    choosing int8 or float by timing both on its first input shape; the model's own weights untouched), its
    features and mask stay close to fp32's, the twin is cached, and the decoder is not quantised."""
    from medsam2.engine import cpu_int8

    model = _tiny()
    img = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    box = np.array([10, 8, 70, 60], np.float32)
    fp32 = predict(model, [img], boxes=[box], precision="fp32")[0]
    twin = runtime.int8_twin(model)
    assert runtime.int8_twin(model) is twin and twin is not runtime.encoder_twin(model)
    block = twin.sam.image_encoder.trunk.blocks[0]
    assert isinstance(block.attn.qkv, cpu_int8.Int8Linear) and block.mlp.layers[0].post == "gelu"
    assert isinstance(block.mlp.act, torch.nn.Identity)  # the GELU moved into the first Linear
    assert type(model.sam.image_encoder.trunk.blocks[0].attn.qkv) is torch.nn.Linear
    assert not any(isinstance(m, cpu_int8.Int8Linear) for m in twin.sam.sam_mask_decoder.modules())
    int8 = predict(model, [img], boxes=[box], precision="int8")[0]
    assert block.attn.qkv.choice  # it measured and chose a path for the shape it saw
    assert segmentation_metrics(int8.mask, fp32.mask)["dice"] > 0.95 and abs(int8.iou_pred - fp32.iou_pred) < 0.05
    x = torch.randn(1, 3, 64, 64)
    linears = [m for m in twin.modules() if isinstance(m, cpu_int8.Int8Linear)]
    with torch.no_grad():
        want = model.encode(x)["image_embed"]
        for m in linears:  # every Linear in int8: the quantised path itself, not only what timing picked
            m.force = True
        got = twin.encode(x.to(next(twin.parameters()).dtype))["image_embed"].float()
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 0.05, rel  # quantised (not bit-equal), and close
    with torch.no_grad():
        next(model.sam.image_encoder.parameters()).add_(1.0)
    assert runtime.int8_twin(model) is not twin


def test_int8_linear_matches_float_and_keeps_the_faster_path():
    """Int8Linear on its own: int8 output within 2 % of the float Linear's (GELU fused too), in the input's
    dtype and shape; the first call per shape records a choice, which later calls of that shape follow."""
    from medsam2.engine import cpu_int8

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 192).requires_grad_(False)
    for post in ("none", "gelu"):
        m = cpu_int8.Int8Linear(lin, post)
        x = torch.randn(2, 5, 7, 96)
        want = m.baseline(x)
        torch.testing.assert_close(want, m.float(x), rtol=1e-5, atol=1e-5)  # oneDNN's fp32 = PyTorch's
        got = m.int8(x)
        assert got.shape == (2, 5, 7, 192) and got.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) < 0.02
        assert m.int8(x.bfloat16()).dtype == torch.bfloat16
        m(x)
        assert list(m.choice) == [(70, torch.float32)]
        m.choice[(70, torch.float32)] = True
        assert torch.equal(m(x), m.int8(x))
        m.choice[(70, torch.float32)] = False
        assert torch.equal(m(x), want)


def test_int8_quantiser_runs_eager_where_compiling_fails(monkeypatch, caplog):
    """A missing C++ compiler cannot be produced on this host, so compiling is made to raise (a mock, for that
    fault only): the quantiser then runs eager, warns once, and gives the same codes."""
    from medsam2.engine import cpu_int8

    x = torch.randn(300, 96) * 3 + 1
    want = cpu_int8._quantize(x)  # compiled
    monkeypatch.setattr(cpu_int8, "_EAGER", [])
    monkeypatch.setattr(cpu_int8, "_compiled", lambda: (_ for _ in ()).throw(RuntimeError("no C++ compiler")))
    with caplog.at_level("WARNING", logger="medsam2.engine.cpu_int8"):
        got = cpu_int8._quantize(x)
        cpu_int8._quantize(x)
    assert [r.getMessage().count("no C++ compiler") for r in caplog.records if r.name == cpu_int8.log.name] == [1]
    assert int((got[0].int() - want[0].int()).abs().max()) <= 1 and torch.allclose(got[1], want[1])
    q, scale, zero = got  # and the codes are a quantisation of x: dequantised within half a step
    assert q.dtype == torch.uint8 and float(((q.float() - zero) * scale - x).abs().max()) <= float(scale) * 0.51


def test_int8_on_cuda_falls_back_to_bf16():
    assert runtime.inference_precision(torch.device("cuda"), "int8") == "bf16"
    assert runtime.inference_precision(torch.device("cpu"), "int8") == "int8"
