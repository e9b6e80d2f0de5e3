"""Serving throughput over HTTP: img/s at batch 1 and 8 through ``mlflow models serve``, beside the same requests
handled in-process (the pyfunc's own code, no HTTP), and the answer sizes of each mask encoding.

    python benchmarks/serve_throughput.py --out benchmarks/results/serve-throughput-cpu-$(date +%Y%m%d).json
    python benchmarks/serve_throughput.py --quick      # 64 px, 2 images, a smoke of the same path

The model is the demo recipe's architecture (``configs/demo.yaml``: hiera_t, image size, decoder, box crop and
prior, flip TTA) with random weights (none can be downloaded here; the weights do not change the cost), logged
and registered as ``champion`` in a private SQLite store, served by ``mlflow models serve --env-manager local``
with one worker. The inputs are real Kvasir-SEG PraNet test images (JPEG bytes, base64) with the tight box of
their masks. One "batch" = one HTTP request holding that many records; img/s = images / wall time of the
sequential requests, after two warm-up requests. The mask encodings are compared on the same answer: base64
PNG, COCO RLE, and the nested JSON integer lists the pyfunc returned before issue 19.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common as bench
import numpy as np


def _records(n: int) -> list[dict]:
    from medsam2.data.readers import read_raster

    root = Path(os.environ.get("MEDSAM2_SAMPLE_DATA", bench.REPO.parent / "shared" / "data")) / "kvasir-seg"
    stems = (bench.REPO / "medsam2" / "data" / "resources" / "kvasir_split_pranet_test.txt").read_text().split()
    out = []
    for stem in stems[:n]:
        m = read_raster(root / "masks" / f"{stem}.jpg", as_mask=True)
        ys, xs = np.nonzero((m if m.ndim == 2 else m[..., 0]) > 127)
        out.append({"image": base64.b64encode((root / "images" / f"{stem}.jpg").read_bytes()).decode("ascii"),
                    "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]})
    return out


def _post(port: int, body: dict) -> tuple[int, bytes, float]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, r.read(), time.perf_counter() - t
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.perf_counter() - t


def _rate(send, records: list[dict], batch: int, repeats: int) -> dict:
    """Sequential requests of ``batch`` records (cycling through ``records``) → img/s and latency."""
    reqs = [[records[(i * batch + j) % len(records)] for j in range(batch)] for i in range(repeats)]
    for r in reqs[:2]:
        send(r)  # warm-up
    lat = []
    t0 = time.perf_counter()
    for r in reqs:
        lat.append(send(r))
    wall = time.perf_counter() - t0
    return {"batch": batch, "requests": repeats, "images": batch * repeats, "wall_s": round(wall, 3),
            "img_s": round(batch * repeats / wall, 3), "latency_p50_s": round(statistics.median(lat), 4),
            "latency_max_s": round(max(lat), 4)}


def _start_server(env: dict, log: Path) -> tuple[subprocess.Popen, int, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/medsam2@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        if proc.poll() is not None:
            raise SystemExit("server exited:\n" + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc, port, time.perf_counter() - t
        except OSError:
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=16, help="distinct test images cycled through the requests")
    ap.add_argument("--repeats", type=int, default=None, help="requests per batch size (default 16; quick 3)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 16)
    n_img = 2 if args.quick else args.images

    import mlflow

    from medsam2 import tracking
    from medsam2.engine.checkpoint import atomic_save, build_model, load_model, model_payload
    from medsam2.engine.serve import ServeLimits, serve

    home = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    os.environ["MEDSAM2_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cfg, recipe = bench.recipe_config({"model.image_size": 64} if args.quick else {})
    model, base = build_model(cfg.model)
    ckpt = atomic_save(model_payload(model, cfg, base), home / "final.pt")
    tracking.setup(cfg)
    with mlflow.start_run():
        t = time.perf_counter()
        uri = tracking.log_model(ckpt)
        log_s = time.perf_counter() - t
    mv = mlflow.register_model(uri, "medsam2")
    tracking._client().set_registered_model_alias("medsam2", "champion", mv.version)
    records = _records(n_img)

    net, ecfg = load_model(ckpt)
    limits = ServeLimits()

    def in_process(recs: list[dict]) -> float:
        t = time.perf_counter()
        serve(net, ecfg.model.prompt, recs, {"format": "png"}, limits)
        return time.perf_counter() - t

    result: dict = {"benchmark": "serve_throughput", "mode": "quick" if args.quick else "full",
                    **bench.cpu_environment(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "model": {"recipe": str(bench.DEMO_CONFIG.relative_to(bench.REPO)), **recipe,
                              "weights": "random init (cost does not depend on the weights)"},
                    "inputs": f"{n_img} Kvasir-SEG PraNet test images (JPEG, base64) with their masks' tight boxes",
                    "log_model_s": round(log_s, 2), "baseline_in_process": [], "http": []}
    for b in (1, 8):
        result["baseline_in_process"].append(_rate(in_process, records, b, repeats))
        bench.log(f"in-process batch {b}: {result['baseline_in_process'][-1]['img_s']} img/s")

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc, port, start_s = _start_server(env, home / "serve.log")
    try:
        result["server_start_s"] = round(start_s, 2)

        def http(recs: list[dict]) -> float:
            status, body, dt = _post(port, {"inputs": recs})
            assert status == 200, body[:500]
            return dt

        for b in (1, 8):
            result["http"].append(_rate(http, records, b, repeats))
            bench.log(f"http batch {b}: {result['http'][-1]['img_s']} img/s")
        sizes = {}
        for fmt in ("png", "rle"):
            status, body, _ = _post(port, {"inputs": records[:1], "params": {"format": fmt}})
            sizes[fmt] = len(body)
            if fmt == "png":
                from medsam2.engine.serve import decode_mask

                mask = decode_mask(json.loads(body)["predictions"][0])
        sizes["json_int_lists_before"] = len(json.dumps({"predictions": [mask.astype(np.uint8).tolist()]}))
        result["answer_bytes_one_image"] = sizes
        result["answer_shape"] = list(mask.shape)
        status, body, _ = _post(port, {"inputs": [{"image": records[0]["image"]}]})
        result["example_refusal"] = {"status": status, "body": json.loads(body)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    for h, p in zip(result["http"], result["baseline_in_process"], strict=True):
        h["http_overhead_vs_in_process"] = round(p["img_s"] / h["img_s"], 3)
    bench.write_json(args.out, result)
    print(json.dumps(bench.finite(result)))
    return result


if __name__ == "__main__":
    main()
