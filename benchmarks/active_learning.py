"""Active learning on Kvasir-SEG: test Dice per labelling round, images chosen by each acquisition score or at
random (``medsam2.active.scores.ACQUISITIONS``), and the failure flags' Spearman on test.

Training images are Kvasir's ``split_other`` + ``split_pool`` train rows (the PraNet test split is frozen, a
patient-bucketed 10 % is val; neither is ever labelled or ranked). Round 0 labels a deterministic ``--start``
fraction (10 %) of the train images (``data.label_fraction``'s seeded subset) and trains once; it is every arm's
starting model. Each of ``--rounds`` rounds (3) then, per arm, ranks that arm's unlabelled pool with its
previous model (``medsam2.active.pool.rank_pool``: prompts are the rows' Kvasir boxes, never a hidden mask), adds
the top ``--add`` fraction (5 % of the train images) with their true masks (the oracle annotator) and trains a
*fresh* model from the recipe (``configs/demo.yaml``) with the same step budget on the arm's labelled set: only
*which* images are labelled differs between arms. Every model is evaluated on the PraNet test split at original
resolution with 95 % bootstrap CIs (``engine.evaluate``); the final round's models also fit failure flags on val
(``engine.evaluate.fit_flags``) and report Spearman(confidence, Dice) on test.

The best score is chosen on *val* Dice at the last round (test is never looked at for a choice); its test gap to
random is reported with a paired bootstrap CI. The **ceiling** is the same recipe and steps trained on *every*
train label; a 25 % subset rarely beats it, so ``summary.headroom`` (ceiling − random at the last round) is about
the largest gap any score could show under this budget. Goals (issue 18): best − random ≥ 0.02 Dice at round 3,
and Spearman(confidence, Dice) ≥ 0.5 on test. Rounds run round by round across arms, so ``--max-minutes`` (40)
cuts whole rounds last and the arms stay comparable at every round that ran; what was cut is in ``skipped``.

    python benchmarks/active_learning.py --quick      # smoke: a handful of images, 1 step, 1 round
    python benchmarks/active_learning.py --out benchmarks/results/active-learning-cpu-$(date +%Y%m%d)   # ≤ 40 min
    python benchmarks/active_learning.py --scores random --steps 400 --set model.prompt=points \
        --set model.box_mask=false --set model.box_prior=none --set model.box_crop=null   # a recipe's headroom

Sizing (2 CPU cores, native bf16). Measured on 20261202 with ``--scores entropy random --rounds 1`` (271 train
images: 27 to start, +14 per round; 100 test): a 120-step training took 35 s on quiet cores and 145-275 s while
other jobs loaded them (load average ~5); a test evaluation ~11 s; ranking the 244-image pool 8 s (random) to 24 s
(entropy, the pass every score makes); ingest 5 s. The full plan is 1 + 5 × 3 = 16 trainings + evaluations and
15 rankings (tta_flip: a second pass; kcenter: + embeddings): ≈ 16 × 50 s + 15 × 30 s ≈ 21 min on quiet cores;
on loaded ones ``--max-minutes 40`` cuts the last rounds, and ``skipped`` says which.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bench  # noqa: E402
import label_efficiency as le  # noqa: E402

CPU = {"start": 0.10, "add": 0.05, "rounds": 3, "steps": 120, "max_minutes": 40.0, "min_fit": 5}
QUICK = {"start": 0.25, "add": 0.125, "rounds": 1, "steps": 1, "max_minutes": None, "min_fit": 2}
GOAL_GAP = 0.02
GOAL_SPEARMAN = 0.5


def round_workdir(src: Path, dst: Path, labelled_ids: set[str]) -> Path:
    """A work dir whose manifest is ``src``'s with every train mask outside ``labelled_ids`` hidden (the pool),
    val and test untouched; cache files are read from ``src`` (absolute uris)."""
    from medsam2.data.manifest import read_manifest
    from medsam2.engine.self_training import write_round_manifest

    df = read_manifest(src)
    hide = df[(df["split"] == "train") & (df["label_kind"] == "mask") & ~df["image_id"].isin(labelled_ids)]
    write_round_manifest(src, dst, hide, pd.DataFrame({"image_id": pd.Series(dtype="string")}))
    return dst


def parse_sets(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items → dotted recipe overrides, read by ``medsam2 train --set``'s parser
    (:func:`medsam2.config.parse_overrides`: ``false``, ``null``, ``3e-4``, ``points``)."""
    from medsam2.config import parse_overrides
    from medsam2.errors import ConfigError

    try:
        return bench._flatten(parse_overrides(items))
    except ConfigError as exc:
        raise SystemExit(f"--set needs KEY=VALUE: {exc} ({exc.hint})") from None


def train_and_eval(work: Path, out: Path, tag: str, plan: dict, *, baselines: bool, flags: bool) -> dict:
    """Train the recipe (with the plan's ``sets``) on ``work``'s labelled rows for the plan's steps, evaluate on
    test → a table row."""
    from medsam2.engine.checkpoint import load_model
    from medsam2.engine.evaluate import evaluate
    from medsam2.engine.train import train
    from medsam2.eval.calibration import CalibrationCfg

    cfg, record = bench.recipe_config({
        "name": f"active-{tag}", "data.workdir": str(work), "data.train_datasets": ["kvasir-seg"],
        "data.eval_datasets": ["kvasir-seg"], "train.max_steps": plan["steps"], "train.max_minutes": None,
        "train.checkpoint_every": plan["steps"], "train.output_dir": str(out / "runs" / tag), "train.device": "cpu",
        "train.progress": False, "eval.gallery_size": 0, "eval.robustness": False, "eval.baselines": baselines,
        **({"train.eval_every": plan["steps"]} if plan["steps"] < 10 else {}), **plan.get("sets", {})})
    t0 = time.perf_counter()
    res = train(cfg)
    model, _ = load_model(res.checkpoint, "cpu")
    calibration = CalibrationCfg(min_fit=plan["min_fit"]) if flags else None
    ev = evaluate(model, cfg, out / "eval" / tag, title=f"active learning: {tag}", calibration=calibration)
    m = ev.metrics
    clean = ev.per_image[(ev.per_image["method"] == "model") & (ev.per_image["condition"] == "clean")]
    row = {"tag": tag, "steps": res.steps, "train_s": round(res.wall_s, 2),
           "val_dice": res.metrics.get("selected_val_dice", res.metrics.get("last_val_dice")),
           **{k: m.get(k) for k in ("test_dice", "test_dice_ci_low", "test_dice_ci_high", "test_iou",
                                    "baseline_ellipse_in_box_dice", "test_confidence_spearman",
                                    "test_confidence_spearman_raw",
                                    "test_confidence_ece", "test_confidence_ece_raw", "test_flag_precision",
                                    "test_flag_recall", "test_flag_rate", "test_flag_below",
                                    "val_confidence_spearman")},
           "n_test": ev.n_images, "overrides": record["overrides"], "checkpoint": res.checkpoint,
           "per_image": dict(zip(clean["image_id"], clean["dice"], strict=True))}
    cal_json = out / "eval" / tag / "calibration.json"
    if flags and cal_json.is_file():  # which input the flags calibrated (chosen on val) and every input's val ρ
        cal = json.loads(cal_json.read_text())
        row["confidence_input"] = cal["calibrator"]["input"]
        row["confidence_input_spearman_val"] = cal["input_spearman_val"]
    row["total_s"] = round(time.perf_counter() - t0, 2)
    del model
    return row


def rank(checkpoint: str, work: Path, score: str, k: int, seed: int, src_masks: Path) -> tuple[list[str], dict]:
    """The ``k`` pool images ``score`` ranks first with the model of ``checkpoint`` → (ids, diagnostics: the
    model's true Dice on the chosen images and on the whole pool, from the hidden masks of ``src_masks``)."""
    import torch

    from medsam2.active.pool import labelled_rows, pool_rows, rank_pool
    from medsam2.data.dataset import load_cached
    from medsam2.data.manifest import read_manifest
    from medsam2.engine.checkpoint import load_model
    from medsam2.metrics import batch_dice

    model, cfg = load_model(checkpoint, "cpu")
    pool = pool_rows(work)
    t0 = time.perf_counter()
    items = rank_pool(model, pool, work, score, len(pool), labelled=labelled_rows(work), seed=seed,
                      precision=cfg.train.precision)
    rank_s = time.perf_counter() - t0
    truth = read_manifest(src_masks).set_index("image_id")
    dice = []
    for it in items:  # the oracle's masks, read only to say how good the model was on what each score picked
        mask = load_cached(src_masks, truth.loc[it.row["image_id"]])[1]
        pair = [torch.from_numpy(np.ascontiguousarray(m))[None].float() for m in (it.pred.mask, np.asarray(mask) > 0)]
        dice.append(float(batch_dice(*pair, from_logits=False)[0]))  # Dice only: HD95 is not needed here
    del model
    return [str(it.row["image_id"]) for it in items[:k]], {
        "pool": len(pool), "rank_s": round(rank_s, 2), "chosen_model_dice": float(np.mean(dice[:k])),
        "pool_model_dice": float(np.mean(dice)), "chosen_scores": [it.score for it in items[:k]]}


def plot(rows: list[dict], arms: list[str], path: Path, ceiling: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    start = next(r for r in rows if r["round"] == 0)
    for k, arm in enumerate(arms):
        rs = [start] + sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["round"])
        x = np.array([r["labelled_pct"] for r in rs]) + 0.08 * (k - len(arms) / 2)  # dodge overlapping bars
        y = [r["test_dice"] for r in rs]
        err = [[r["test_dice"] - r["test_dice_ci_low"] for r in rs], [r["test_dice_ci_high"] - r["test_dice"]
                                                                       for r in rs]]
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=arm, ls="--" if arm == "random" else "-")
    if ceiling is not None:
        ax.axhline(ceiling["test_dice"], ls="-.", c="black", lw=1, label="every train label (ceiling)")
    if start.get("baseline_ellipse_in_box_dice") is not None:
        ax.axhline(start["baseline_ellipse_in_box_dice"], ls=":", c="grey", lw=1, label="ellipse-in-box")
    ax.set(xlabel="labelled training images (%)", ylabel="Dice, PraNet test split (95 % CI)",
           title="Kvasir-SEG active learning, demo recipe on CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(rows: list[dict], arms: list[str], per_image: dict, ceiling: dict | None = None) -> dict:
    """The val-chosen best score at the last round that every arm reached, its test gap to random (paired
    bootstrap), the Spearman goal on that model's failure flags, and the headroom to the all-labels
    ``ceiling`` row."""
    done = [max((r["round"] for r in rows if r["arm"] == a), default=0) for a in arms]
    last = min(done) if done else 0
    if last == 0 or "random" not in arms:
        return {"last_round": last, "note": "no round past the start for every arm (or no random arm)"}
    at = {r["arm"]: r for r in rows if r["round"] == last}
    headroom = None if ceiling is None else {
        "ceiling_test_dice": ceiling["test_dice"],
        "ceiling_minus_random": ceiling["test_dice"] - at["random"]["test_dice"],
        "ceiling_minus_start": ceiling["test_dice"] - next(r for r in rows if r["round"] == 0)["test_dice"]}
    dice = {"val_dice": {a: at[a]["val_dice"] for a in arms}, "test_dice": {a: at[a]["test_dice"] for a in arms}}
    scored = [a for a in arms if a != "random"]
    if not scored:  # a headroom probe (--scores random): nothing to choose, nothing to compare
        return {"last_round": last, "headroom": headroom, "note": "random arm only: no score to compare", **dice}
    best = max(scored, key=lambda a: at[a]["val_dice"] if at[a]["val_dice"] is not None else -1.0)
    paired = le._paired_gap(per_image[("random", last)], per_image[(best, last)])
    gap = at[best]["test_dice"] - at["random"]["test_dice"]
    rho = at[best].get("test_confidence_spearman")
    return {"last_round": last, "headroom": headroom, "best_score": best,
            "chosen_on": "val Dice of the last round's models",
            **dice,
            "gap_best_vs_random": {"gap": gap, **{k: paired.get(k) for k in ("ci_low", "ci_high", "p_improve", "n")}},
            "goals": {"best_beats_random": {"threshold": GOAL_GAP, "value": gap, "met": bool(gap >= GOAL_GAP)},
                      "spearman_confidence_dice": {"threshold": GOAL_SPEARMAN, "value": rho,
                                                   "met": None if rho is None else bool(rho >= GOAL_SPEARMAN)}}}


def main(argv: list[str] | None = None) -> dict:
    import logging

    from medsam2.active.scores import ACQUISITIONS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke: a handful of images, 1 step, 1 round")
    ap.add_argument("--data", help="folder holding kvasir-seg/ (default $MEDSAM2_SAMPLE_DATA or shared data)")
    ap.add_argument("--out", help="results folder (default: a temp dir for --quick, else benchmarks/results/…)")
    ap.add_argument("--scores", nargs="+", choices=ACQUISITIONS.names(), help="arms (default: every score)")
    for k in ("start", "add"):
        ap.add_argument(f"--{k}", type=float)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--max-minutes", type=float)
    ap.add_argument("--no-ceiling", action="store_true", help="skip the every-train-label training")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override, read as train --set reads it (repeatable), e.g. --set model.prompt=points")
    args = ap.parse_args(argv)
    logging.getLogger("medsam2").setLevel(logging.WARNING)
    from pydantic import ValidationError

    from medsam2.config import DataCfg, ExperimentCfg
    from medsam2.config_input import config_error
    from medsam2.data.ingest import ingest
    from medsam2.data.selection import select_rows

    plan = dict(QUICK if args.quick else CPU)
    for k in ("start", "add", "rounds", "steps", "max_minutes"):
        if getattr(args, k) is not None:
            plan[k] = getattr(args, k)
    if args.sets:
        plan["sets"] = parse_sets(args.sets)
        try:  # a bad override fails here, in a second, not after ingest and the first training
            bench.recipe_config(plan["sets"])
        except ValidationError as exc:
            raise SystemExit(f"--set: {config_error(exc, ExperimentCfg, '--set')}") from None
    arms = list(dict.fromkeys(args.scores or ACQUISITIONS.names()))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or (tempfile.mkdtemp(prefix="active_") if args.quick
                            else Path(__file__).parent / "results" / f"active-learning-cpu-{stamp}"))
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="active_runs_"))  # checkpoints and round work dirs: never in results
    t0 = time.perf_counter()
    src = le.kvasir_source(args.data)
    if args.quick:
        src = le.quick_subset(src, scratch / "src" / "kvasir-seg", n_train=8, n_val=2, n_test=3)
    base = scratch / "work"
    ingest(str(src), base, dataset="kvasir-seg")
    dc = DataCfg(workdir=str(base), train_datasets=["kvasir-seg"], label_fraction=plan["start"])
    start_rows, pool0 = select_rows(dc, "train", seed=0)
    n_train = len(start_rows) + len(pool0)
    k = max(1, round(plan["add"] * n_train))
    result: dict = {
        "benchmark": "active_learning", "profile": "cpu", "mode": "quick" if args.quick else "full",
        "complete": False, **bench.cpu_environment(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "plan": {**plan, "arms": arms, "n_train": n_train, "start_images": len(start_rows), "add_images": k},
        "protocol": "fresh model per round from the demo recipe, same steps; oracle masks for the chosen images; "
                    "PraNet test split at original resolution, 95 % bootstrap CIs; best score chosen on val Dice",
        "table": [], "skipped": [], "ingest_s": round(time.perf_counter() - t0, 2), "out": str(out)}
    table: list[dict] = result["table"]
    per_image: dict = {}

    def save() -> None:
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        bench.write_json(out / "active_learning.json",
                         {**result, "table": [{kk: v for kk, v in r.items() if kk not in ("checkpoint", "per_image")}
                                              for r in table]})

    def add_row(row: dict, arm: str, rnd: int, labelled: set[str]) -> None:
        row.update(arm=arm, round=rnd, labelled_images=len(labelled),
                   labelled_pct=round(100 * len(labelled) / n_train, 2))
        per_image[(arm, rnd)] = row["per_image"]
        table.append(row)
        bench.log(f"active learning: {arm} round {rnd} ({row['labelled_pct']:g} %): test {row['test_dice']:.4f} "
                  f"val {row['val_dice']} ({row['total_s']:.0f} s)")
        save()

    labelled0 = set(start_rows["image_id"])
    w0 = round_workdir(base, scratch / "rounds" / "start", labelled0)
    add_row(train_and_eval(w0, scratch, "start", plan, baselines=True, flags=plan["rounds"] == 0), "start", 0,
            labelled0)
    if not args.no_ceiling:  # every train label, same recipe and steps: what no selection of 25 % can beat
        ceiling = train_and_eval(base, scratch, "all-labels", plan, baselines=False, flags=False)
        shutil.rmtree(Path(ceiling["checkpoint"]).parent, ignore_errors=True)
        result["ceiling"] = {**{kk: v for kk, v in ceiling.items() if kk not in ("checkpoint", "per_image")},
                             "labelled_images": n_train, "labelled_pct": 100.0}
        bench.log(f"active learning: ceiling (100 %): test {ceiling['test_dice']:.4f}")
        save()
    state = {a: {"labelled": set(labelled0), "work": w0, "checkpoint": table[0]["checkpoint"]} for a in arms}
    for arm in arms:
        per_image[(arm, 0)] = table[0]["per_image"]
    deadline = 60 * plan["max_minutes"] if plan["max_minutes"] else None
    for rnd in range(1, plan["rounds"] + 1):
        for arm in arms:
            st = state[arm]
            est = np.mean([r["total_s"] + r.get("rank_s", 0) for r in table]) if table else 0.0
            elapsed = time.perf_counter() - t0
            if deadline and elapsed + est > deadline:
                result["skipped"].append({"arm": arm, "round": rnd, "reason": f"{elapsed / 60:.1f} min spent + "
                                          f"~{est / 60:.1f} min estimated > --max-minutes {plan['max_minutes']:g}"})
                continue
            if len(pool_ids := set(pool0["image_id"]) - st["labelled"]) < k:
                result["skipped"].append({"arm": arm, "round": rnd, "reason": f"pool {len(pool_ids)} < {k}"})
                continue
            chosen, diag = rank(st["checkpoint"], st["work"], arm, k, rnd, base)
            st["labelled"] |= set(chosen)
            work = round_workdir(base, scratch / "rounds" / f"{arm}-r{rnd}", st["labelled"])
            row = train_and_eval(work, scratch, f"{arm}-r{rnd}", plan, baselines=False, flags=rnd == plan["rounds"])
            row.update(chosen=chosen, **diag)
            if rnd > 1:  # the arm's previous model (round 1's is the shared start model): ~0.5 GB, no longer read
                shutil.rmtree(Path(st["checkpoint"]).parent, ignore_errors=True)
            st.update(work=work, checkpoint=row["checkpoint"])
            add_row(row, arm, rnd, st["labelled"])
    result["summary"] = summarise(table, arms, per_image, result.get("ceiling"))
    plot(table, arms, out / "active_learning.png", result.get("ceiling"))
    result["plot"] = str(out / "active_learning.png")
    result["complete"] = True
    save()
    shutil.rmtree(scratch, ignore_errors=True)
    printed = bench.finite({**result, "table": [{kk: v for kk, v in r.items() if kk not in ("checkpoint", "per_image")}
                                                for r in table]})
    print(json.dumps(printed))
    return printed


if __name__ == "__main__":
    main()
