"""ATen operators dispatched per optimizer step: the kit's trainer against diffusers' reference trainer
(examples/amused/train_amused.py), at real size on this CPU.

    python bench/ops_per_step.py --reference PATH/TO/train_amused.py            # kit from its cache vs reference
    python bench/ops_per_step.py --reference ... --sides kit-cache kit kit-cuda-optimizer reference

At batch 1 a GPU step is launch-bound: its time goes to dispatching many small kernels, so the number of operators a
step dispatches is what to cut, and it can be counted on a CPU. Same set-up as bench/cpu_vs_reference.py (whose
loaders this reuses): real-size amused-256 with random weights, LoRA rank 16 / alpha 32 on to_q/to_k/to_v, batch 1,
no accumulation, fp32, AdamW, clipping at 1, eager. Each side runs in a fresh process for --steps optimizer steps under
a TorchDispatchMode that sees every ATen operator (backward included); a step is everything between the end of one
optimizer step and the end of the next (the first step, with its lazy initialisations, is not counted), split into

    forward     inside the U-ViT's forward (UVit2DModel.forward)
    backward    inside torch.autograd.backward
    optimizer   inside optimizer.step()
    clip        inside accelerate's or torch's clip_grad_norm_
    encode      the frozen VQ encoder and CLIP text encoder (none from the kit's cache)
    data        fetching the next batch from the data loader (CPU tensors: reading images, or the cache's files)
    other       everything else: masking, condition dropout, the loss, logging, the schedule, EMA

and into compute and view operators (an operator whose output aliases its input: view, t, transpose, detach, ...).
Host syncs: `aten::_local_scalar_dense` (`.item()`, `float(t)`, `int(t)`, `bool(t)`), `Tensor.tolist()` and the
operators whose output size depends on the data (nonzero, masked_select, unique), each a wait for the device on a
GPU; they are reported by phase, "end" being after the optimizer step (reading the step's loss for the log).
Sides: `kit-cache` (the kit's defaults), `kit` (without the cache: VQ and CLIP each step, as the reference),
`kit-cuda-optimizer` (the kit from its cache with the AdamW it builds on CUDA: fused), `reference`.
Writes OUT/ops_per_step.json and OUT/ops_per_step.txt (the table printed).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_vs_reference as side_by_side  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIDES = ("kit-cache", "kit", "kit-cuda-optimizer", "reference")
PHASES = ("forward", "backward", "optimizer", "clip", "encode", "data", "other", "end")
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
            "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default"}


class Phase:
    """The phase the process is in: a stack, the innermost named region wins (a loss inside `forward` stays
    `forward`; a backward inside nothing else is `backward`)."""

    def __init__(self):
        self.stack: list[str] = []

    @property
    def now(self) -> str:
        return self.stack[-1] if self.stack else "other"

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if phase == "encode" and self.now != "other":  # a frozen encoder called inside a phase belongs to it
                return original(*args, **kwargs)
            self.stack.append(phase)
            try:
                return original(*args, **kwargs)
            finally:
                self.stack.pop()

        wrapped.__wrapped__ = original
        setattr(owner, name, wrapped)


def caller() -> str:
    """file:line of the innermost frame in the kit or the reference script (where a host sync comes from)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if "amused_tune" in name or name.endswith("train_amused.py"):
            return f"{Path(name).name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def count_worker(args) -> None:
    """Run one side under the counting mode; write the per-step counts to args.result."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.set_num_threads(1)
    phase = Phase()
    steps: list[dict] = []
    current = {"ops": collections.Counter(), "views": collections.Counter(), "syncs": collections.Counter(),
               "by_op": collections.Counter(), "sync_ops": collections.Counter()}
    state = {"started": False}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if state["started"]:
                where = phase.now
                current["ops"][where] += 1
                current["views"][where] += bool(func.is_view)
                name = str(func)
                current["by_op"][f"{where} {name}"] += 1
                if name in SYNC_OPS:
                    current["syncs"][where] += 1
                    current["sync_ops"][f"{where} {name} {caller()}"] += 1
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        if state["started"]:
            current["syncs"][phase.now] += 1
            current["sync_ops"][f"{phase.now} Tensor.tolist {caller()}"] += 1
        return tolist(self)

    torch.Tensor.tolist = counted_tolist

    from diffusers import UVit2DModel, VQModel
    from diffusers.models.autoencoders.vq_model import VectorQuantizer
    from transformers import CLIPTextModelWithProjection

    phase.wrap(UVit2DModel, "forward", "forward")
    phase.wrap(torch.autograd, "backward", "backward")
    from accelerate import Accelerator

    phase.wrap(Accelerator, "clip_grad_norm_", "clip")  # both trainers clip through accelerate
    phase.wrap(torch.nn.utils, "clip_grad_norm_", "clip")
    phase.wrap(VQModel, "encode", "encode")
    phase.wrap(VectorQuantizer, "forward", "encode")
    phase.wrap(CLIPTextModelWithProjection, "forward", "encode")

    def pre(optimizer, a, k):
        phase.stack.append("optimizer")

    def post(optimizer, a, k):
        phase.stack.pop()
        if state["started"]:  # one step ends here: everything since the previous optimizer step
            steps.append({key: dict(value) for key, value in current.items()})
            for value in current.values():
                value.clear()
        state["started"] = True
        phase.stack.append("end")  # until the first operator of the next step's work: see `first_op`

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)

    # "end": what a trainer does after its optimizer step (the schedule, zero_grad, reading the loss for the log)
    # until it fetches the next batch; the next step starts when the data loader is asked for a batch
    import torch.utils.data.dataloader as dataloader

    def leave_end():
        while "end" in phase.stack:
            phase.stack.remove("end")

    next_batch = dataloader._BaseDataLoaderIter.__next__

    def counted_next(self):
        leave_end()
        phase.stack.append("data")
        try:
            return next_batch(self)
        finally:
            phase.stack.pop()

    dataloader._BaseDataLoaderIter.__next__ = counted_next

    if args.side == "kit-cuda-optimizer":  # the AdamW the kit builds on CUDA: fused
        adamw_init = torch.optim.AdamW.__init__

        def fused_init(self, *a, **k):
            k["fused"], k["foreach"] = True, None
            adamw_init(self, *a, **k)

        torch.optim.AdamW.__init__ = fused_init

    work = Path(args.work)
    out = Path(tempfile.mkdtemp(prefix=f"ops-{args.side}-", dir=work))
    with Count():
        if args.side == "reference":
            side_by_side.run_reference(args.reference, work, out, args.steps)
        else:
            side_by_side.run_kit(work, out, args.steps, cache=args.side != "kit")
    Path(args.result).write_text(json.dumps(steps) + "\n")


def run_side(side: str, args, work: Path) -> list[dict]:
    result = work / f"ops-{side}-{time.time_ns()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, __file__, "--worker", side, "--steps", str(args.steps), "--work", str(work),
           "--result", str(result), "--reference", str(args.reference or "")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"{side} exited {done.returncode}")
    return json.loads(result.read_text())


def summarise(steps: list[dict]) -> dict:
    """The last counted step (every counted step of a side dispatches the same operators; checked)."""
    last = steps[-1]
    ops = {p: last["ops"].get(p, 0) for p in PHASES}
    views = {p: last["views"].get(p, 0) for p in PHASES}
    syncs = {p: last["syncs"].get(p, 0) for p in PHASES}
    return {"steps_counted": len(steps), "same_every_step": all(s["ops"] == last["ops"] for s in steps),
            "ops": ops, "views": views, "syncs": syncs, "total": sum(ops.values()), "views_total": sum(views.values()),
            "syncs_total": sum(syncs.values()), "sync_ops": last["sync_ops"],
            "top_ops": dict(collections.Counter(last["by_op"]).most_common(40))}


def table(results: dict) -> str:
    sides = list(results["sides"])
    lines = ["ATen operators per optimizer step (real-size amused-256, LoRA r16 on q/k/v, batch 1, fp32, eager, CPU)",
             "", "| phase | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
    for p in PHASES:
        cells = [f"{results['sides'][s]['ops'][p]:,} ({results['sides'][s]['ops'][p] - results['sides'][s]['views'][p]:,})"
                 for s in sides]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    cells = [f"{r['total']:,} ({r['total'] - r['views_total']:,})" for r in results["sides"].values()]
    lines.append("| **total** | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("(in brackets: compute operators, views left out)")
    lines.append("")
    lines.append("| host syncs by phase | " + " | ".join(sides) + " |")
    lines.append("|---|" + "---|" * len(sides))
    for p in PHASES:
        lines.append(f"| {p} | " + " | ".join(str(results["sides"][s]["syncs"][p]) for s in sides) + " |")
    lines.append("")
    for s in sides:
        sites = ", ".join(f"{n} x {k}" for k, n in sorted(results["sides"][s]["sync_ops"].items()))
        lines.append(f"host syncs of {s}: {sites or 'none'}")
    ref = results["sides"].get("reference")
    if ref:
        lines.append("")
        ref_fb = ref["ops"]["forward"] + ref["ops"]["backward"]
        ref_fb_c = ref_fb - ref["views"]["forward"] - ref["views"]["backward"]
        for s in sides:
            if s == "reference":
                continue
            r = results["sides"][s]
            fb = r["ops"]["forward"] + r["ops"]["backward"]
            fb_c = fb - r["views"]["forward"] - r["views"]["backward"]
            inside = r["syncs_total"] - r["syncs"]["end"] - r["syncs"]["data"]
            lines.append(f"{s}: forward + backward {fb:,} = {fb / ref_fb:.2f}x the reference's {ref_fb:,} "
                         f"(compute only {fb_c:,} = {fb_c / ref_fb_c:.2f}x); whole step {r['total']:,} = "
                         f"{r['total'] / ref['total']:.2f}x {ref['total']:,}; host syncs inside the step "
                         f"{inside}, after it {r['syncs']['end']}, in the data loader (host-side files) {r['syncs']['data']} "
                         f"(reference {ref['syncs_total'] - ref['syncs']['end'] - ref['syncs']['data']}, "
                         f"{ref['syncs']['end']} and {ref['syncs']['data']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", help="path to diffusers' examples/amused/train_amused.py")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=["kit-cache", "kit-cuda-optimizer", "reference"])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per process (the first is not counted)")
    p.add_argument("--work", default=None, help="work folder (shared with bench/cpu_vs_reference.py; default: temporary)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default="ops_per_step", help="file name of the results (OUT/NAME.json, OUT/NAME.txt)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.side = args.worker
        count_worker(args)
        return 0
    if "reference" in args.sides and not (args.reference and Path(args.reference).is_file()):
        raise SystemExit("pass --reference PATH to diffusers' examples/amused/train_amused.py (see --help)")
    work = Path(args.work or tempfile.mkdtemp(prefix="amused-ops-bench-"))
    side_by_side.prepare(work, 8)
    if any("cache" in s or s == "kit-cuda-optimizer" for s in args.sides) \
            and not list((work / "cache").glob("tokens-*/shard-*")):  # the cache, once, uncounted
        side_by_side.run_one("kit-cache", 1, argparse.Namespace(steps=1, reference=None, timeout=args.timeout), work)
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_head(),
               "command": "python bench/ops_per_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "sides": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for side in args.sides:
        results["sides"][side] = summarise(run_side(side, args, work))
        print(f"[{time.strftime('%H:%M:%S')}] {side}: {results['sides'][side]['total']:,} operators per step", flush=True)
        (out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results)
    (out / f"{args.name}.txt").write_text(f"{results['command']}\n{results['date']}, git {results['git']}\n\n{text}\n")
    print(text)
    return 0


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
