"""Ingest throughput: first ingest, re-ingest (incremental no-op), cache reads vs decoding the sources.

Prints one JSON object on its last stdout line::

    python benchmarks/ingest_throughput.py [--source DIR] [--quick] [--workdir DIR]

--quick copies 20 image/mask pairs of the source into a temp folder (a few seconds on 2 CPU cores).
Default source: ``$MEDSAM2_SAMPLE_DATA/kvasir-seg`` (``../shared/data`` or ``/work/shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

from medsam2.data.images import read_image_any
from medsam2.data.ingest import ingest
from medsam2.data.manifest import read_manifest


def _default_source() -> Path:
    for base in (os.environ.get("MEDSAM2_SAMPLE_DATA"), "../shared/data", "/work/shared/data"):
        if base and (Path(base) / "kvasir-seg").is_dir():
            return Path(base) / "kvasir-seg"
    raise SystemExit("no sample data: pass --source or set MEDSAM2_SAMPLE_DATA")


def _quick_copy(src: Path, dest: Path, n: int = 20) -> Path:
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    for p in sorted((src / "images").iterdir())[:n]:
        shutil.copy(p, dest / "images" / p.name)
        m = src / "masks" / p.name
        if m.exists():
            shutil.copy(m, dest / "masks" / p.name)
    return dest


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    src = args.source or _default_source()
    tmp = Path(tempfile.mkdtemp(prefix="medsam2-bench-"))
    try:
        if args.quick:
            src = _quick_copy(src, tmp / src.name)
        wd = args.workdir or tmp / "work"
        if wd.exists():
            shutil.rmtree(wd)
        t = time.perf_counter()
        first = ingest(str(src), wd, salt="bench")
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        again = ingest(str(src), wd, salt="bench")
        t_again = time.perf_counter() - t
        df = read_manifest(wd)
        n = len(df)
        t = time.perf_counter()
        for r in df.itertuples():
            img = np.load(wd / r.image_uri, mmap_mode="r")
            float(img[::8, ::8].mean())  # touch the pages
            if isinstance(r.mask_uri, str):
                np.load(wd / r.mask_uri, mmap_mode="r")
        t_cache = time.perf_counter() - t
        t = time.perf_counter()
        for r in df.itertuples():
            read_image_any(r.source_uri)
        t_decode = time.perf_counter() - t
        out = {
            "benchmark": "ingest_throughput",
            "host": socket.gethostname(),
            "device": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "source": str(args.source or "kvasir-seg sample") + (" (quick: 20 pairs)" if args.quick else ""),
            "n_images": n,
            "first_ingest_images_per_s": round(n / t_first, 2),
            "reingest_images_per_s": round(n / t_again, 2),
            "reingest_added": again.added,
            "cache_read_images_per_s": round(n / t_cache, 2),
            "source_decode_images_per_s": round(n / t_decode, 2),
            "cache_speedup": round(t_decode / t_cache, 2),
            "quarantined": first.quarantined,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
