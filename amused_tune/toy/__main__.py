"""``python -m amused_tune.toy build`` rebuilds the toy weights; ``python -m amused_tune.toy eval`` measures them."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amused_tune.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="rebuild the toy pipeline from scratch (CPU, ~15 min)")
    b.add_argument("--out", default=None, help="output pipeline folder (default: amused_tune/toy/weights)")
    b.add_argument("--work", default=None, help="scratch folder for the world images and the training run")
    b.add_argument("--vq-steps", type=int, default=1000)
    b.add_argument("--uvit-steps", type=int, default=2000)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--lr", type=float, default=1.5e-3, help="U-ViT peak learning rate")
    b.add_argument("--vq-held-out", action="store_true",
                   help="also train the VQ on the held-out colours purple/orange (worse round trip, see docs/toy.md)")
    b.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible, robust on a shared CPU)")
    e = sub.add_parser("eval", help="caption-match rate and guidance sweep of a toy pipeline")
    e.add_argument("--dir", default=None, help="pipeline folder (default: the shipped toy weights)")
    e.add_argument("--prompts", type=int, default=50)
    e.add_argument("--seeds", type=int, default=2)
    e.add_argument("--steps", type=int, default=12)
    e.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.command == "build":
        from amused_tune.toy import WEIGHTS_DIR
        from amused_tune.toy.build import build

        out = Path(args.out) if args.out else WEIGHTS_DIR
        with tempfile.TemporaryDirectory(prefix="amused-toy-") as tmp:
            record = build(out, Path(args.work) if args.work else Path(tmp), args.vq_steps, args.uvit_steps,
                           args.batch_size, uvit_lr=args.lr, vq_held_out=args.vq_held_out)
        print(json.dumps(record, indent=2))
        return 0

    from amused_tune.models import _load_folder
    from amused_tune.toy import toy_dir
    from amused_tune.toy.evaluate import evaluate

    comps = _load_folder(Path(args.dir) if args.dir else toy_dir())
    print(json.dumps(evaluate(comps, args.prompts, tuple(range(args.seeds)), args.steps), indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
