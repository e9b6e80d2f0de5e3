"""Throughput benchmarks (train / infer / loader): quick mode end to end on CPU, JSON keys, import isolation
(the GPU machine has no mlflow, prefect, ray, great-expectations or pydicom), the GPU plan and the shell scripts."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPTS = ("train_throughput", "infer_throughput", "loader_throughput")
BLOCKED = ("mlflow", "prefect", "ray", "great_expectations", "pydicom")
RESULT_KEYS = {"name", "baseline", "config", "precision", "batch", "img_s", "mfu", "model_only", "with_loader",
               "peak_mem_bytes", "peak_mem_kind", "flops_per_step", "gflop_per_image", "data"}
CONFIG_KEYS = {"backbone", "image_size", "adapter", "decoder", "prompt"}


def run_script(name: str, *args: str, timeout: int = 600) -> dict:
    """Run ``benchmarks/<name>.py`` in a fresh interpreter; its last stdout line is the JSON object."""
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must hold exactly one JSON line, got {len(lines)}: {proc.stdout[:500]}"
    return json.loads(lines[0])


def check_common(res: dict, benchmark: str, out: Path) -> None:
    assert res["benchmark"] == benchmark and res["complete"] is True and res["mode"] == "quick"
    assert res["device"]["type"] == "cpu" and res["device"]["name"] and res["device"]["torch"] == torch.__version__
    assert json.loads(out.read_text()) == res  # --out holds the same object
    assert res["wall_s"] > 0


def check_model_results(res: dict) -> None:
    assert "mfu_peak_flops" in res and res["mfu_peak_note"]
    for r in res["results"]:
        assert "error" not in r and "skipped" not in r, r
        assert RESULT_KEYS <= set(r), sorted(RESULT_KEYS - set(r))
        assert CONFIG_KEYS <= set(r["config"]) and r["config"]["image_size"] == 64 and r["batch"] == 2
        assert r["img_s"] > 0 and r["model_only"]["img_s"] > 0 and r["model_only"]["step_ms"] > 0
        assert r["flops_per_step"] > 0 and r["peak_mem_bytes"] > 0 and r["peak_mem_kind"] == "process_rss_peak"
        assert r["mfu"] is None  # no peak figure for a CPU
    baselines = [r for r in res["results"] if r["baseline"]]
    assert baselines and all(r["precision"] == "fp32" for r in baselines)  # fp32 baseline on CPU
    assert all(r.get("speedup_vs_baseline") for r in res["results"])


@pytest.fixture(scope="module")
def tiny_workdir(sample_data: Path, tmp_path_factory) -> Path:
    """6 real Kvasir-SEG pairs copied to tmp and ingested (skips, via ``sample_data``, when the data is absent)."""
    from medsam2.data.ingest import ingest

    src_root = sample_data / "kvasir-seg"
    if not (src_root / "images").is_dir():
        pytest.skip(f"no Kvasir-SEG images under {src_root}")
    root = tmp_path_factory.mktemp("bench-kvasir")
    src = root / "kvasir-seg"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for p in sorted((src_root / "images").iterdir())[:6]:
        shutil.copy(p, src / "images" / p.name)
        shutil.copy(src_root / "masks" / p.name, src / "masks" / p.name)
    ingest(str(src), root / "work")
    return root / "work"


def test_benchmark_modules_import_without_orchestration_stack() -> None:
    """Each benchmark module imports with mlflow/prefect/ray/great-expectations/pydicom unimportable, and pulls
    in neither medsam2.tracking nor medsam2.data.ingest."""
    code = (
        "import sys\n"
        f"for m in {BLOCKED!r}: sys.modules[m] = None\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import importlib\n"
        f"for name in ('common',) + {SCRIPTS!r}: importlib.import_module(name)\n"
        "bad = [m for m in ('medsam2.tracking', 'medsam2.data.ingest') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.slow  # ~1 min on 2 cores: six tiny variants, one traced by dynamo
def test_train_quick(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    res = run_script("train_throughput", "--quick", "--out", str(out))
    check_common(res, "train_throughput", out)
    check_model_results(res)
    assert res["data"]["source"] == "synthetic"
    by_name = {r["name"]: r for r in res["results"]}
    assert set(by_name) == {
        "hiera_t/full/fp32/eager", "hiera_t/decoder_only/fp32/eager", "hiera_t/bottleneck/fp32/eager",
        "hiera_t/lora/fp32/eager", "hiera_t/full/fp32/compile", "hiera_t/full/fp32/eager+ckpt",
    }
    assert by_name["hiera_t/full/fp32/eager"]["baseline"]
    comp = by_name["hiera_t/full/fp32/compile"]
    assert comp["compile"] and (comp["compiled"] and comp["compile_s"] > 0 or comp["compile_error"])
    assert by_name["hiera_t/full/fp32/eager+ckpt"]["checkpointed_blocks"] > 0
    full, frozen = by_name["hiera_t/full/fp32/eager"], by_name["hiera_t/decoder_only/fp32/eager"]
    assert frozen["trainable_params"] < full["trainable_params"] <= full["total_params"]
    assert frozen["flops_per_step"] < full["flops_per_step"]  # no backward through a frozen encoder
    assert {t["target"] for t in res["targets"]} and not any(t["comparable"] for t in res["targets"])


@pytest.mark.slow  # ~30-70 s on 2 shared cores: two variants, each timed on synthetic and real batches
def test_train_quick_real_data(tiny_workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    res = run_script("train_throughput", "--quick", "--workdir", str(tiny_workdir), "--variants", "decoder_only",
                     "--out", str(out))
    check_common(res, "train_throughput", out)
    check_model_results(res)
    assert res["data"]["source"] == "real" and res["data"]["images"] == 6
    assert [r["name"] for r in res["results"]] == ["hiera_t/full/fp32/eager", "hiera_t/decoder_only/fp32/eager"]
    for r in res["results"]:
        assert r["data"] == "real" and r["with_loader"]["img_s"] == r["img_s"] > 0


def test_infer_quick(tmp_path: Path) -> None:
    out = tmp_path / "infer.json"
    res = run_script("infer_throughput", "--quick", "--out", str(out))
    check_common(res, "infer_throughput", out)
    check_model_results(res)
    names = [r["name"] for r in res["results"]]
    assert names == ["hiera_t/fp32/eager", "hiera_t/fp32/compile"]
    assert res["results"][1]["compile_s"] > 0 or res["results"][1]["compile_error"]
    assert res["targets"][0]["target_img_s"] == 300.0


def test_loader_quick(tiny_workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    res = run_script("loader_throughput", "--quick", "--workdir", str(tiny_workdir), "--model-img-s", "5",
                     "--out", str(out))
    check_common(res, "loader_throughput", out)
    assert res["data"]["images"] == 6 and res["data"]["image_size"] == 64
    assert res["model"]["model_img_s"] == 5.0
    grid = {(r["num_workers"], r["augment"]) for r in res["results"]}
    assert grid == {(0, "none"), (2, "none"), (0, "light"), (2, "light")}
    for r in res["results"]:
        assert r["img_s"] > 0 and r["startup_s"] >= 0 and r["ratio_to_model"] == pytest.approx(r["img_s"] / 5, 0.01)
        assert isinstance(r["meets_1_5x"], bool)
    assert set(res["per_sample_ms"]) == {"none", "light"} and set(res["best"]) == {"none", "light"}


def test_gpu_plan_orders_baselines_first(monkeypatch) -> None:
    """The full (GPU) plan: eager bf16 baselines first, compile only for hiera_t, hiera_l with checkpointing."""
    monkeypatch.syspath_prepend(str(BENCH))
    tt = importlib.import_module("train_throughput")
    args = tt.parse_args(["--device", "cuda"])
    variants, notes = tt.plan(args, torch.device("cuda"))
    names = [v.name for v in variants]
    assert names[:2] == ["hiera_t/full/bf16/eager", "hiera_b+/full/bf16/eager"] and not notes
    assert [n for n in names if "compile" in n] == ["hiera_t/full/bf16/compile"]
    assert "hiera_l/full/bf16/eager+ckpt" in names and "hiera_b+/lora/bf16/eager" in names
    assert names.index("hiera_t/full/bf16/compile") < names.index("hiera_t/full/fp32/eager")
    assert {v.batch for v in variants if v.backbone == "hiera_l"} == {4}
    assert args.image_size == 1024 and args.batch == 8 and args.steps == 20 and args.warmup == 5


@pytest.mark.parametrize("script", ["run_gpu.sh", "make_device_bundle.sh"])
def test_shell_scripts_parse(script: str) -> None:
    proc = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.gpu
def test_train_compile_on_gpu(tmp_path: Path) -> None:
    """On a CUDA machine: bf16 baseline and inductor compile of hiera_t at 256 px, a few steps."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out = tmp_path / "train.json"
    res = run_script("train_throughput", "--backbones", "hiera_t", "--variants", "compile,decoder_only",
                     "--image-size", "256", "--steps", "3", "--warmup", "2", "--out", str(out))
    by_name = {r["name"]: r for r in res["results"]}
    assert by_name["hiera_t/full/bf16/eager"]["baseline"] and by_name["hiera_t/full/bf16/eager"]["mfu"] is not None
    assert by_name["hiera_t/full/bf16/compile"].get("compiled") is not None
    assert res["device"]["type"] == "cuda"
    assert by_name["hiera_t/full/bf16/eager"]["peak_mem_kind"] == "cuda_max_allocated"
