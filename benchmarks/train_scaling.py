"""Data-parallel scaling on CPU: training img/s of one process against ``train.num_workers=2`` Ray Train workers,
the same recipe, data, seed and global batch, in one run.

    python benchmarks/train_scaling.py --out benchmarks/results/train-scaling-cpu-$(date +%Y%m%d).json
    python benchmarks/train_scaling.py --quick          # 64 px, 4 steps: a smoke of the same path

Arms (each trains from scratch into its own run dir, real Kvasir-SEG images through the real loader):

- ``1 process``: ``medsam2.engine.train.train`` with every core (torch's default threads), the baseline;
- ``2 workers``: ``tuning.distributed.run_train_distributed`` with 1 CPU per worker (Ray gives each worker
  ``OMP_NUM_THREADS=1``), gradients all-reduced over gloo.

img/s is the loop's own figure (``TrainResult.images_per_s``: images of the global batch per second of the
attempt's training wall time, the one evaluation at the last step included in both arms); the distributed arm's
Ray start-up is outside it and reported apart (``launch_overhead_s``). On a machine with N cores, N workers ×
1 thread against 1 process × N threads measures what data parallelism costs (all-reduce, duplicated per-step
work), not added hardware: the multi-node GPU plan is in ``infra/README.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common as bench

sys.path.insert(0, str(bench.REPO))


def _recipe(args: argparse.Namespace, workdir: Path, out: Path, uri: str) -> list[str]:
    return [f"data.workdir={workdir}", f"train.output_dir={out}", f"model.image_size={args.image_size}",
            f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", "train.warmup_steps=1",
            f"train.eval_every={args.steps}", f"train.checkpoint_every={args.steps}", "train.progress=false",
            "train.device=cpu", "data.augment=none", f"tracking.tracking_uri={uri}", "train.precision=fp32"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="global batch (split over the workers)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--images", type=int, default=24, help="Kvasir images ingested for the run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.image_size, args.steps, args.images = 64, 4, 8
    from medsam2.config import load_config
    from medsam2.engine.train import train
    from tuning.distributed import run_train_distributed

    source = bench.default_kvasir_source()
    if source is None:
        sys.exit("Kvasir-SEG not found: set MEDSAM2_SAMPLE_DATA")
    report = {"benchmark": "train-scaling", "mode": "quick" if args.quick else "full",
              "environment": bench.cpu_environment(),
              "recipe": {"backbone": "hiera_t", "weights": "random init", "image_size": args.image_size,
                         "global_batch": args.batch, "steps": args.steps, "adapter": "default config",
                         "precision": "fp32"}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medsam2-scaling-") as tmp, bench.stdout_to_stderr():
        root = Path(tmp)
        workdir = bench.ingest_subset(source, root / "data", args.images)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        one = train(load_config(overrides=_recipe(args, workdir, root / "one", uri)))
        base = one.images_per_s
        bench.log(f"1 process: {base:.2f} img/s")
        t0 = time.perf_counter()
        two = run_train_distributed(load_config(overrides=[*_recipe(args, workdir, root / "two", uri),
                                                           "train.num_workers=2"]), quiet=True)
        total = time.perf_counter() - t0
        two_img_s = two["images_per_s"]
        bench.log(f"2 workers: {two_img_s:.2f} img/s")
    report["arms"] = [
        {"name": "1 process", "workers": 1, "threads_per_worker": report["environment"]["torch_threads"],
         "images_per_s": base, "train_wall_s": one.wall_s},
        {"name": "2 workers (Ray Train, gloo)", "workers": 2, "threads_per_worker": 1, "images_per_s": two_img_s,
         "train_wall_s": two["wall_s"], "launch_overhead_s": total - two["wall_s"]},
    ]
    report["speedup_2_vs_1"] = two_img_s / base
    report["note"] = ("both arms use the same cores, so the speed-up is the data-parallel efficiency on this "
                      "machine; scaling to more hardware is the multi-node plan in infra/README.md")
    report.update(complete=True, wall_s=time.perf_counter() - t_start)
    bench.write_json(args.out, report)
    print(json.dumps(bench.finite(report)))


if __name__ == "__main__":
    main()
