"""Pretraining pool from two sites: what ``load_pool`` holds in memory and how long it takes.

malf35's training pool (16 scans at 1 mm, after 6 test and 3 validation subjects) plus the 148
IXI scans (``pretrain.unlabelled``), preprocessed to 2 mm as a pretraining run does: the number
of images, the bytes the cached volumes hold, the seconds to read and resample them, and the
process's peak RSS. Writes ``benchmarks/results/pretrain_pool.json``.

Usage (from the repository root, lowlabel's venv active):
    nice -n 10 python benchmarks/pretrain_pool.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    import torch

    from lowlabel.config import load_config
    from lowlabel.data.cohort import load_pool
    from lowlabel.provenance import machine, peak_rss_mb

    torch.set_num_threads(1)
    out = ROOT / "benchmarks" / "results"
    load_before = [round(v, 2) for v in os.getloadavg()]
    cfg = load_config(
        None,
        {
            "out": str(ROOT / "runs" / "bench-pool"),
            "data.dataset": str(DATA / "malf35" / "dataset.json"),
            "data.spacing": [2.0, 2.0, 2.0],
            "pretrain.unlabelled": [str(DATA / "ixi" / "dataset.json")],
        },
    )
    t0 = time.perf_counter()
    pool = load_pool(cfg, progress=False)
    seconds = time.perf_counter() - t0
    sizes = [item["image"].numel() * item["image"].element_size() for item in pool.items]
    result = {
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "torch_threads": 1,
        "spacing_mm": list(cfg.data.spacing),
        "pool_images": len(pool.images),
        "sources": pool.split["sources"],
        "dropped": len(pool.split["dropped"]),
        "validation_images": len(pool.val),
        "cached_mb": round(sum(sizes) / 2**20, 1),
        "cached_mb_per_image": {
            "median": round(sorted(sizes)[len(sizes) // 2] / 2**20, 2),
            "max": round(max(sizes) / 2**20, 2),
        },
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_pool.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
