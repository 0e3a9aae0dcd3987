"""What decides which backgrounds a single-image StyleDrop adapter frames, on the toy base.

For each background colour, the toy base reads the world captions on it with " in [v] style" (3 shapes x 5 colours)
in two states of sampling: every token masked (the first step), and only the outer ring masked with the inside given
(the world image's own cells: the last steps). At the 28 ring positions it reports, averaged over the prompts:

- the base's logit margin of the background's code over grey's (what an adapter has to overcome to draw the frame);
- each adapter's gain: how much it raises grey's logit against the background's (adapter - base);
- with the adapter, the share of ring positions whose most likely code is grey (the frame is drawn there; the
  toy's surest prediction of a code is p ~ 0.59, the rest kept on the others by its label smoothing);
- the cosine of the base's final features (the output head's input) at the ring between backgrounds, and of each
  adapter's change of those features between backgrounds (is the adapter's change the same whatever the content?).

    python bench/styledrop_ring_states.py RUN_DIR [RUN_DIR ...]     # run folders of toy StyleDrop runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from amused_tune.model.bases import encode_images, encode_prompts, load_components, micro_conditioning
from amused_tune.toy import toy_dir, world
from amused_tune.toy.finetune_eval import _apply_run

GREY = list(world.PALETTE).index("grey")  # the toy's VQ code of a palette colour is its index in PALETTE


def ring_mask(side: int) -> torch.Tensor:
    m = torch.zeros(side, side, dtype=torch.bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m


@torch.no_grad()
def ring_readout(comps, background: str, state: str) -> dict:
    """Logits [n, 28, codes] and head-input features [n, 28, C] at the ring for every styled prompt on `background`."""
    specs = [world.ShapeSpec(s, c, background) for s in world.SHAPES for c in world.WORLD_COLOURS if c != background]
    prompts = [world.caption(s) + world.STYLE_SUFFIX for s in specs]
    hidden, pooled = encode_prompts(comps.text_encoder, comps.tokenizer, prompts)
    mask_id = int(comps.transformer.config.vocab_size) - 1
    tokens = encode_images(comps.vqvae, torch.from_numpy(world.to_array([world.render(s) for s in specs])))
    ring = ring_mask(tokens.shape[-1])
    tokens = torch.where(ring if state == "ring" else torch.ones_like(ring), mask_id, tokens)
    micro = micro_conditioning(world.SIZE, world.SIZE)[None].repeat(len(prompts), 1)
    features = {}
    hook = comps.transformer.mlm_layer.register_forward_hook(lambda m, a, out: features.update(x=a[0]))
    try:
        logits = comps.transformer(tokens, encoder_hidden_states=hidden, pooled_text_emb=pooled, micro_conds=micro)
    finally:
        hook.remove()
    at_ring = lambda t: t.permute(0, 2, 3, 1)[:, ring]  # [n, C, h, w] -> [n, 28, C]
    return {"logits": at_ring(logits.float()), "features": at_ring(features["x"].float())}


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders of toy StyleDrop runs (adapter/ inside)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = load_components(str(toy_dir()))
    tuned = {Path(r).parent.name if Path(r).name == "run" else Path(r).name: _apply_run(base, Path(r)) for r in args.runs}
    bgs = world.WORLD_COLOURS
    for state in ("all", "ring"):
        print(f"\n## {'every token masked' if state == 'all' else 'ring masked, inside given'}\n")
        before = {b: ring_readout(base, b, state) for b in bgs}
        after = {name: {b: ring_readout(c, b, state) for b in bgs} for name, c in tuned.items()}
        code = {b: list(world.PALETTE).index(b) for b in bgs}
        print("| background | base margin bg - grey | " + " | ".join(f"{n}: gain / grey top" for n in tuned) + " |")
        print("|---|---|" + "---|" * len(tuned))
        for b in bgs:
            lb = before[b]["logits"]
            margin = float((lb[..., code[b]] - lb[..., GREY]).mean())
            cells = []
            for name in tuned:
                la = after[name][b]["logits"]
                gain = float(((la[..., GREY] - la[..., code[b]]) - (lb[..., GREY] - lb[..., code[b]])).mean())
                cells.append(f"{gain:.1f} / {float((la.argmax(-1) == GREY).float().mean()):.2f}")
            print(f"| {b} | {margin:.1f} | " + " | ".join(cells) + " |")
        print("\nbase ring features, mean over prompts, cosine between backgrounds:\n")
        mean = {b: before[b]["features"].mean((0, 1)) for b in bgs}
        print("| | " + " | ".join(bgs) + " |\n|---|" + "---|" * len(bgs))
        for a in bgs:
            print(f"| {a} | " + " | ".join(f"{cos(mean[a], mean[b]):.2f}" for b in bgs) + " |")
        for name in tuned:
            delta = {b: (after[name][b]["features"] - before[b]["features"]).mean((0, 1)) for b in bgs}
            norms = " ".join(f"{b} {float(delta[b].norm()):.1f}" for b in bgs)
            print(f"\n{name}: the adapter's change of the ring features, norm: {norms}; cosine between backgrounds:\n")
            print("| | " + " | ".join(bgs) + " |\n|---|" + "---|" * len(bgs))
            for a in bgs:
                print(f"| {a} | " + " | ".join(f"{cos(delta[a], delta[b]):.2f}" for b in bgs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
