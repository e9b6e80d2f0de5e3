"""bf16 only where it is fast: on a CPU without native bf16 (AVX-512 BF16 / AMX) an asked-for bf16 runs fp32,
because emulated bf16 made the demo recipe 10x slower (12.1 vs 1.2 s/step on AVX2-only cores)."""

from __future__ import annotations

import torch

from medsam2.engine import runtime

CPU = torch.device("cpu")


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("flags\t\t: fpu sse sse2 avx avx2 fma\n")
    amx = tmp_path / "amx"
    amx.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert runtime.cpu_has_native_bf16(str(avx2)) is False
    assert runtime.cpu_has_native_bf16(str(amx)) is True
    assert runtime.cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_bf16_on_a_cpu_without_it_runs_fp32(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    runtime._warn_emulated_bf16.cache_clear()
    with caplog.at_level("WARNING"):
        assert runtime.effective_precision(CPU, "bf16") == "fp32"
        with runtime.autocast(CPU, "bf16"):
            assert not torch.is_autocast_enabled("cpu")
    assert "no native bf16" in caplog.text


def test_bf16_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.effective_precision(CPU, "bf16") == "bf16"
    with runtime.autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu")
    assert runtime.effective_precision(CPU, "auto") == "fp32"  # CPU: bf16 only when asked for
    assert runtime.effective_precision(torch.device("cuda"), "auto") == "bf16"
    assert runtime.effective_precision(torch.device("cuda"), "fp32") == "fp32"


def test_prediction_defaults_to_bf16_only_where_the_cpu_has_it(monkeypatch):
    """``predict``'s ``auto``: bf16 on CPUs with native bf16 (1.7-2.0x fp32 there, Dice 0.9997 vs fp32 on the
    demo champion), fp32 elsewhere; an explicit choice is kept, and training's ``auto`` stays fp32 on CPU."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.inference_precision(CPU) == "bf16"
    assert runtime.inference_precision(CPU, "fp32") == "fp32"
    assert runtime.effective_precision(CPU, "auto") == "fp32"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.inference_precision(CPU) == "fp32"
    assert runtime.inference_precision(torch.device("cuda")) == "bf16"


def test_freed_large_blocks_are_kept_on_glibc(monkeypatch):
    """pick_device('cpu') keeps freed large tensors' memory (glibc mallopt); MEDSAM2_MALLOC=system opts out.
    Its speed is measured in benchmarks/cpu_infer.py, not here."""
    import platform

    runtime.pick_device("cpu")
    if platform.libc_ver()[0] == "glibc":
        assert runtime.keep_freed_memory() is True
    monkeypatch.setenv("MEDSAM2_MALLOC", "system")
    assert runtime.keep_freed_memory.__wrapped__() is False
