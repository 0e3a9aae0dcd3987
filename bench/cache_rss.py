"""Peak memory (RSS) of building the token cache: one shard of N images at 512 px with 4 random crops and flips
(8 variants per image), encoded by the tiny VQ model (the pixels, not the model, are what is measured).

    python bench/cache_rss.py --images 64      # prints the peak RSS above the process's baseline, in GB

Run it once per version of the kit (PYTHONPATH=...) to compare; docs/data.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--resolution", type=int, default=512)
    args = p.parse_args(argv)
    import torch

    from amused_tune.data import cache
    from amused_tune.data.cards import resolve_config
    from amused_tune.data.sources import open_source
    from amused_tune.model.bases import build_tiny
    from amused_tune.recipe import DataConfig

    torch.set_num_threads(1)
    comps = build_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        folder.mkdir()
        rng = np.random.default_rng(0)
        rows = []
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 255, (args.resolution + 64, args.resolution + 128, 3), dtype=np.uint8)
                            ).save(folder / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}))
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
        cfg = resolve_config(DataConfig(source="imagefolder", path=str(folder), center_crop=False, random_crops=4,
                                        random_flip=True, cache_dir=str(Path(tmp) / "cache")))
        source = open_source(cfg)
        baseline = rss_gb()
        started = time.perf_counter()
        tensors, _ = cache.encode_shard(source, source.records, cfg, args.resolution, 0, comps,
                                        type("Bar", (), {"update": lambda self, n: None})())
        seconds = time.perf_counter() - started
    print(json.dumps({"images": args.images, "variants": int(tensors["tokens"].shape[1]),
                      "resolution": args.resolution, "baseline_rss_gb": round(baseline, 3),
                      "peak_rss_gb": round(rss_gb(), 3), "peak_above_baseline_gb": round(rss_gb() - baseline, 3),
                      "seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
