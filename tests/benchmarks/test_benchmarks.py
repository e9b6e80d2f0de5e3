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

from tests.conftest import GET_SAMPLE_DATA, skip_or_fail

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
        skip_or_fail(f"no Kvasir-SEG images under {src_root}", GET_SAMPLE_DATA)
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


@pytest.mark.slow  # ~1 min on 2 cores: a local Ray starts for the 2-worker arm
def test_train_scaling_quick(sample_data: Path, tmp_path: Path) -> None:
    """One process against 2 Ray Train workers on the same recipe and data: both arms trained and timed."""
    out = tmp_path / "scaling.json"
    res = run_script("train_scaling", "--quick", "--out", str(out))
    assert res["complete"] is True and res["mode"] == "quick" and json.loads(out.read_text()) == res
    one, two = res["arms"]
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["images_per_s"] > 0 and two["images_per_s"] > 0 and two["launch_overhead_s"] > 0
    assert res["speedup_2_vs_1"] == pytest.approx(two["images_per_s"] / one["images_per_s"])
    assert res["environment"]["git_commit"]


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
        assert r["meets_1_5x"] is (r["ratio_to_model"] >= 1.5)  # the loader target: >= 1.5x the model's img/s
    assert set(res["per_sample_ms"]) == {"none", "light"} and set(res["best"]) == {"none", "light"}
    for augment, best in res["best"].items():
        meeting = [r["num_workers"] for r in res["results"] if r["augment"] == augment and r["ratio_to_model"] >= 1.5]
        assert best["fewest_workers_meeting_1_5x"] == (min(meeting) if meeting else None)


def test_count_flops_counts_cpu_attention(monkeypatch) -> None:
    """CPU attention counts: 4·B·H·L·S·D forward (torch's FlopCounterMode has no formula for the CPU flash
    kernel, so it counted 0), 2.5× that more for the backward; a matmul beside it still counts 2·M·N·K."""
    monkeypatch.syspath_prepend(str(BENCH))
    common = importlib.import_module("common")
    b, h, n_q, n_k, d = 2, 4, 96, 80, 16
    q = torch.randn(b, h, n_q, d, requires_grad=True)
    k, v = torch.randn(b, h, n_k, d), torch.randn(b, h, n_k, d)
    attn = 4 * b * h * n_q * n_k * d
    assert common.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == attn
    with torch.no_grad():  # inference: same kernel, same count
        assert common.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == attn
    a, w = torch.randn(32, 16), torch.randn(16, 8)
    assert common.count_flops(lambda: (torch.nn.functional.scaled_dot_product_attention(q, k, v), a @ w)) == (
        attn + 2 * 32 * 16 * 8)
    fwd_bwd = common.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    assert fwd_bwd == attn + attn * 5 // 2


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


# ---------------------------------------------------------------------------------------------- CPU quality profiles


def _demo_recipe() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


def _bench_module(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module(name)


def test_recipe_config_keeps_the_demo_recipe_and_records_overrides(tmp_path: Path, monkeypatch) -> None:
    """The CPU profiles take the demo recipe as is, apply only named overrides, and for prompt-free drop every
    box-only key of the recipe (recorded with its value) so the config validates."""
    common = _bench_module("common", monkeypatch)
    recipe = _demo_recipe()
    cfg, rec = common.recipe_config({"train.max_minutes": 2.0, "train.output_dir": str(tmp_path)})
    assert rec["recipe"] == "configs/demo.yaml" and rec["dropped"] == {}
    assert rec["overrides"] == {"train.max_minutes": 2.0, "train.output_dir": str(tmp_path)}
    for section in ("model", "train", "data"):
        for key, value in recipe.get(section, {}).items():
            if f"{section}.{key}" not in rec["overrides"] and key != "workdir":
                assert getattr(getattr(cfg, section), key) == value, (section, key)
    assert cfg.train.max_minutes == 2.0

    free, frec = common.recipe_config({"train.max_steps": 5}, prompt_free=True)
    assert free.model.prompt == "none" and free.model.decoder == "prompt_free" and free.model.box_mask is False
    box_keys = {f"model.{k}" for k in recipe["model"] if "box" in k}
    assert box_keys <= set(frec["dropped"])
    assert all(frec["dropped"][k]["recipe_value"] == recipe["model"][k.split(".")[1]] for k in box_keys)
    assert free.model.image_size == recipe["model"]["image_size"] and free.train.lr == recipe["train"]["lr"]

    # a recipe grown with more box-only fields still gives a valid prompt-free config
    grown = tmp_path / "grown.yaml"
    import yaml

    tree = {**recipe, "model": {**recipe["model"], "box_mask": True, "box_jitter": 0.2}}
    grown.write_text(yaml.safe_dump(tree))
    free2, rec2 = common.recipe_config({}, path=grown, prompt_free=True)
    assert free2.model.box_mask is False and {"model.box_mask", "model.box_jitter"} <= set(rec2["dropped"])


def test_robustness_subset_restores_the_library_constants(monkeypatch) -> None:
    common = _bench_module("common", monkeypatch)
    from medsam2.engine import evaluate as ev

    before = (ev.ROBUSTNESS_SEVERITIES, ev.IMAGE_CORRUPTIONS, ev.PROMPT_CORRUPTIONS)
    with common.robustness_subset((3,), ("blur", "box_jitter")):
        assert ev.ROBUSTNESS_SEVERITIES == (3,) and ev.IMAGE_CORRUPTIONS == ("blur",)
        assert ev.PROMPT_CORRUPTIONS == ("box_jitter",)
    assert (ev.ROBUSTNESS_SEVERITIES, ev.IMAGE_CORRUPTIONS, ev.PROMPT_CORRUPTIONS) == before
    with pytest.raises(ValueError, match="unknown corruptions"), common.robustness_subset((3,), ("nope",)):
        pass


def test_trivial_prompt_free_baselines_fallback(tiny_workdir: Path, monkeypatch) -> None:
    """The fallback used when the evaluation has no empty / mean-mask rows: real masks, Dice in range."""
    common = _bench_module("common", monkeypatch)
    quality = _bench_module("quality", monkeypatch)
    from medsam2.data.selection import select_rows

    cfg, _ = common.recipe_config({"data.workdir": str(tiny_workdir)}, prompt_free=True)
    rows, _ = select_rows(cfg.data, "train")
    out = quality.trivial_prompt_free_baselines(cfg, rows)
    assert set(out) == {"empty", "mean_mask"} and out["empty"]["n"] == out["mean_mask"]["n"] == len(rows) > 0
    assert out["empty"]["dice"] == 0.0  # every Kvasir image has a polyp
    assert 0.0 < out["mean_mask"]["dice"] <= 1.0


def test_semisup_choice_uses_val_dice_only(monkeypatch) -> None:
    le = _bench_module("label_efficiency", monkeypatch)
    rows = [{"method": "mean_teacher", "val_dice": 0.61, "test_dice": 0.99},
            {"method": "mutual_consistency", "val_dice": 0.70, "test_dice": 0.10},
            {"method": "adversarial", "val_dice": float("nan"), "test_dice": 1.0}]
    assert le.choose_semisup(rows) == "mutual_consistency"
    assert le.choose_semisup([{"method": "adversarial", "val_dice": None}, {"method": "mean_teacher",
                                                                            "val_dice": 0.0}]) == "mean_teacher"


def _check_goal(goal: dict, meets: bool | None, applies: bool) -> None:
    assert goal["meets_threshold"] == meets and goal["applies"] == applies
    assert goal["met"] == (meets if applies else None)


def _check_ci(row: dict, key: str, low: str, high: str) -> None:
    assert 0.0 <= row[key] <= 1.0
    assert row[low] - 1e-9 <= row[key] <= row[high] + 1e-9


@pytest.mark.slow  # ~1.5 min on 2 cores: two 3-s trainings of the demo recipe, evaluated on 3 + 4 real images
def test_quality_cpu_profile_quick(sample_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "quality-cpu.json"
    res = run_script("quality", "--profile", "cpu", "--quick", "--data", str(sample_data), "--out", str(out),
                     timeout=900)
    assert json.loads(out.read_text()) == res
    assert res["benchmark"] == "quality" and res["profile"] == "cpu" and res["complete"] is True
    assert res["device"] == "cpu" and res["cpu_model"] and res["torch"] == torch.__version__ and res["git_commit"]
    recipe = _demo_recipe()
    assert res["recipe"] == "configs/demo.yaml" and res["demo_budget_minutes"] == recipe["train"]["max_minutes"]
    assert set(res["results"]) == {"box", "prompt_free"} and res["phases_s"]["ingest_s"] >= 0
    budget = res["budget_minutes"]
    assert budget["prompt_free"] == pytest.approx(budget["box"] / 3)
    for mode, r in res["results"].items():
        resolved = r["config"]["resolved"]
        assert resolved["model"]["image_size"] == recipe["model"]["image_size"]
        assert resolved["train"]["batch_size"] == recipe["train"]["batch_size"]
        assert resolved["train"]["lr"] == recipe["train"]["lr"]
        assert r["config"]["overrides"]["train.max_minutes"] == budget[mode] == r["budget_minutes"]
        tr = r["train"]
        assert tr["steps"] >= 1 and tr["stopped_by_budget"] is True and tr["s_per_step"] > 0
        assert tr["images_seen"] == tr["steps_run"] * resolved["train"]["batch_size"] * resolved["train"]["grad_accum"]
        assert r["n_test"] == 3 and r["cvc"]["n"] == 4
        _check_ci(r["kvasir_test"], "test_dice", "test_dice_ci_low", "test_dice_ci_high")
        _check_ci(r["kvasir_test"], "test_iou", "test_iou_ci_low", "test_iou_ci_high")
        _check_ci(r["cvc"], "dice", "dice_ci_low", "dice_ci_high")
        assert r["cross_dataset_drop"] == pytest.approx(r["kvasir_test"]["test_dice"] - r["cvc"]["dice"])
        assert set(r["robust_drop_s3"]) == {"gaussian_noise", "blur", "low_contrast"}
        assert r["robust_drop_s3_max"] == pytest.approx(max(r["robust_drop_s3"].values()))
        ph = r["phases_s"]
        assert ph["train_s"] >= ph["train_loop_s"] > 0 and ph["eval_kvasir_s"] > 0 and ph["eval_cvc_s"] > 0
    box, free = res["results"]["box"], res["results"]["prompt_free"]
    assert box["config"]["resolved"]["model"]["prompt"] == "box"
    assert box["baselines_kvasir"]["ellipse_in_box"]["dice"] > 0.6
    fm = free["config"]["resolved"]["model"]
    assert fm["prompt"] == "none" and fm["decoder"] == "prompt_free" and fm["box_mask"] is False
    assert set(free["trivial_baselines_kvasir"]) == {"empty", "mean_mask"}
    assert free["trivial_baselines_kvasir"]["empty"]["dice"] == 0.0  # every test image has a polyp

    g = res["goals"]
    assert set(g) == {"demo_champion", "budget_15min", "prompt_free_beats_trivial", "cross_dataset_drop",
                      "severity3_drop"}
    kt = box["kvasir_test"]
    _check_goal(g["demo_champion"], kt["test_dice"] >= 0.85 and kt["test_dice_ci_low"] > 0.805,
                budget["box"] <= recipe["train"]["max_minutes"])
    _check_goal(g["budget_15min"], kt["test_dice"] >= 0.88, budget["box"] <= 15)
    best_trivial = max(v["dice"] for v in free["trivial_baselines_kvasir"].values())
    assert g["prompt_free_beats_trivial"]["best_trivial_dice"] == pytest.approx(best_trivial)
    _check_goal(g["prompt_free_beats_trivial"], free["kvasir_test"]["test_dice_ci_low"] > best_trivial, True)
    _check_goal(g["cross_dataset_drop"], box["cross_dataset_drop"] <= 0.05, True)
    _check_goal(g["severity3_drop"], box["robust_drop_s3_max"] <= 0.05, True)


@pytest.mark.slow  # ~2 min on 2 cores: 5 arms x 1 step of the demo recipe, each evaluated on 3 real test images
def test_label_efficiency_cpu_profile_quick(sample_data: Path, tmp_path: Path) -> None:
    res = run_script("label_efficiency", "--profile", "cpu", "--quick", "--fractions", "0.1", "1.0", "--data",
                     str(sample_data), "--out", str(tmp_path), timeout=1200)
    assert json.loads((tmp_path / "label_efficiency.json").read_text()) == res
    assert (tmp_path / "label_efficiency.png").stat().st_size > 0
    assert res["profile"] == "cpu" and res["complete"] is True and res["device"] == "cpu" and res["cpu_model"]
    assert res["torch"] == torch.__version__ and res["budget"]["kind"] == "steps"
    steps = res["budget"]["steps_per_arm"]
    recipe = _demo_recipe()
    table = res["table"]
    assert table and not res["skipped"]
    assert all("fraction" in r and r["fraction"] in (0.1, 1.0) for r in table)
    assert res["plan"]["order"] == [0.1, 1.0]
    by = {(r["arm"], r["fraction"]): r for r in table if r.get("selected", True)}
    for f in (0.1,):
        assert {a for a, ff in by if ff == f} == {"none", "weak_labels", "self_training", "semisup"}
    assert {a for a, ff in by if ff == 1.0} == {"none"}
    for r in table:
        _check_ci(r, "test_dice", "test_dice_ci_low", "test_dice_ci_high")
        assert r["n_test"] == 3 and r["s_per_step"] > 0 and r["train_s"] > 0
        assert r["val_dice"] is None or 0.0 <= r["val_dice"] <= 1.0
        o = r["overrides"]
        assert o["train.max_steps"] == steps and o["data.label_fraction"] == r["fraction"]
        assert o["data.weak_labels"] is (r["arm"] == "weak_labels")
        assert o["semisup.method"] == (r["method"] if r["arm"] == "semisup" else "none")
        assert "model.image_size" not in o and "train.batch_size" not in o  # the demo's, unchanged
        if r["arm"] == "self_training":
            assert r["steps"] == steps * len(r["rounds"]) and r["steps_incl_teacher"] == r["steps"] + steps
        else:
            assert r["steps"] == steps
    assert res["recipe"]["recipe_values"]["model"]["image_size"] == recipe["model"]["image_size"]
    assert res["semisup_chosen"] == "adversarial" and res["semisup_selection_rule"]
    assert res["baselines_test"]["ellipse_in_box_dice"] > 0.6

    s = res["summary"]
    full = by[("none", 1.0)]["test_dice"]
    assert s["full_label_dice"] == full and s["lowest_fraction"] == 0.1
    gap = s["gap_self_training_vs_fair_baseline"]
    expect = by[("self_training", 0.1)]["test_dice"] - by[("weak_labels", 0.1)]["test_dice"]
    assert gap["gap"] == pytest.approx(expect) and gap["n"] == 3
    assert gap["paired_ci_low"] <= gap["gap"] + 1e-9 <= gap["paired_ci_high"] + 2e-9
    assert s["goal"]["value"] == pytest.approx(expect) and s["goal"]["applies"] is True
    assert s["goal"]["met"] is (expect >= 0.03)
    for key, g in s["gap_to_full_labels"].items():
        assert g["gap_to_full"] == pytest.approx(full - by[(g["arm"], g["fraction"])]["test_dice"]), key
    assert set(res["per_arm_s_per_step"]) == {f"{r['arm']}/{r['method']}@{100 * r['fraction']:g}" for r in table}


@pytest.mark.slow  # one ONNX export and three engine processes (~1.5 min)
def test_cpu_infer_quick_compares_engines_on_the_same_images(sample_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cpu_infer.json"
    proc = subprocess.run([sys.executable, str(BENCH / "cpu_infer.py"), "--quick", "--engines",
                           "torch-fp32,onnx-fp32,sam2-predictor", "--data", str(sample_data), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["cpu"] and res["git_commit"] and res["peak_gflop_s"]["fp32"] > 0
    assert res["peak_gflop_s"]["measured_gemm"]["fp32"] > 0
    (cfg,) = res["configs"]
    assert cfg["export"]["parity_fp32"]["logits_max_abs"] <= 1e-3 and cfg["gflop_per_image"] > 0
    rows = {r["engine"]: r for r in cfg["engines"]}
    assert set(rows) == {"torch-fp32", "onnx-fp32", "sam2-predictor"}
    for r in rows.values():
        assert r["img_s"] > 0 and r["peak_rss_mb"] > 0 and 0 <= r["dice_vs_fp32"] <= 1
        gemm = res["peak_gflop_s"]["measured_gemm"]["fp32"]
        assert r["share_of_gemm_peak"] == pytest.approx(r["achieved_gflop_s"] / gemm)
        assert r["speedup_vs_sam2_predictor"] == pytest.approx(r["img_s"] / rows["sam2-predictor"]["img_s"])
    for name in ("torch-fp32", "onnx-fp32"):  # each timed against the predictor in its own process too
        pair = rows[name]["paired"]
        assert pair["n_images"] == 2 and len(pair["engine_s_per_image"]) == 2
        assert pair["speedup"] == pytest.approx(pair["sam2_predictor_s"] / pair["engine_s"])
    assert "paired" not in rows["sam2-predictor"]
    fp32_target = next(t for t in res["targets"] if t["target"].startswith("fp32"))
    assert fp32_target["torch_fp32"] == pytest.approx(rows["torch-fp32"]["paired"]["speedup"])
    assert rows["onnx-fp32"]["dice_vs_fp32"] > 0.999  # the same model through ONNX Runtime
    assert rows["torch-fp32"]["encoder_once"]["cache_hits"] == 5
    assert {t["target"] for t in res["targets"]} >= {"fp32 >= 1.3x SAM2ImagePredictor"}
