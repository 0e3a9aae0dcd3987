"""The README's StyleDrop numbers, from the output file of one toy evaluation command:

    python -m amused_tune.toy eval --styledrop --random 12 --seed 0 --jobs 2 --workdir runs/styledrop-eval \
        --picture assets/quickstart/toy_before_after.png --out docs/styledrop_eval.json
    python bench/styledrop_table.py            # rewrite the block between the styledrop-table markers of README.md
    python bench/styledrop_table.py --print    # print it, write nothing

The block holds the worst image's numbers against the targets, every image's row and the ``[v]`` samples by
background colour; tests/test_styledrop.py checks that the README's block is what this script makes of the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "styledrop_eval.json"
START, END = "<!-- styledrop-table: bench/styledrop_table.py -->", "<!-- /styledrop-table -->"
ROWS = (("style_with", "`... in [v] style`: the frame is drawn", ">= 0.90"),
        ("style_match", "`... in [v] style`: the frame *and* the caption's shape, colour and background", ">= 0.80"),
        ("leak", "prompts without `[v] style`: the frame is drawn (leak; the worst is the highest)", "<= 0.05"),
        ("caption_kept", "prompts without `[v] style` drawn as asked, relative to the base", ">= 0.95"),
        ("clean", "`[v] style` samples without a stray cell", ">= 0.80"))


def worst_said(result: dict) -> str:
    """Which image the picture below shows: the one with the fewest samples with the frame and the caption, or,
    when several tie, the first of them (every one of them is a worst image)."""
    key = lambda r: (r["style_match"], r["style_with"])  # noqa: E731 (the eval's own order: worst_name)
    worst = result["images"][result["worst_image"]]
    tied = sum(key(r) == key(worst) for r in result["images"].values())
    if tied == 1:
        return f"The fewest samples with the frame and the caption: `{result['worst_image']}` (the picture below)."
    return (f"{tied} images tie for the fewest samples with the frame and the caption; the picture below is the "
            f"first of them, `{result['worst_image']}`.")


def render(result: dict) -> str:
    """The README block (markdown) for one `toy eval --styledrop` result."""
    fixed = [n for n in result["images"] if n in FIXED]
    drawn = [n for n in result["images"] if n not in FIXED]
    s = result["sampling"]
    wanted = len(result["styles"])
    so_far = "" if result.get("complete", True) else (
        f"**{len(result['images'])} of the command's {wanted} style images measured so far** (rerun it with the same "
        "`--workdir` to finish: its runs resume). ")
    lines = [f"{so_far}Recipe `{result['recipe']}` ({result['rounds']} round{'s' * (result['rounds'] > 1)}), "
             f"{len(fixed)} fixed style images and {len(drawn)} drawn at random (seed {result['seed']}), "
             f"{result['prompts']} new-content prompts x {len(result['seeds'])} seeds each (guidance "
             f"{s['guidance']:g}, {s['steps']} steps, min_p {s.get('min_p', 0):g}). {worst_said(result)}", "",
             f"| share of samples | worst of the {len(result['images'])} images | target |", "|---|---|---|"]
    for key, label, target in ROWS:
        lines.append(f"| {label} | {result['worst'][key]:.2f} | {target} |")
    lines += ["", "| style image | frame | frame + caption | leak | caption kept | clean |", "|---|---|---|---|---|---|"]
    for name in fixed + drawn:
        r = result["images"][name]
        tag = "" if name in FIXED else " (random)"
        lines.append(f"| `{name}`{tag} | " + " | ".join(f"{r[k]:.2f}" for k, _, _ in ROWS) + " |")
    totals = result["by_background"]
    lines += ["", "`[v]` samples of all images by the prompt's background colour (frame drawn / frame and caption "
                  "drawn, of all):", "",
              "| " + " | ".join(totals) + " |", "|" + "---|" * len(totals),
              "| " + " | ".join(f"{f} / {m} of {n}" for f, m, n in totals.values()) + " |"]
    return "\n".join(lines)


FIXED = ("yellow_square_on_blue", "red_circle_on_black", "blue_triangle_on_white", "white_triangle_on_green",
         "black_circle_on_yellow", "green_square_on_red")  # world.STYLE_IMAGES, without importing the kit


def block_of(text: str) -> str | None:
    """The README's current block, or None without the markers."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", default=str(RESULTS), help="the eval's JSON file")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the block, write nothing")
    args = p.parse_args(argv)
    block = render(json.loads(Path(args.results).read_text()))
    print(block)
    if args.print_only:
        return 0
    text = README.read_text()
    if block_of(text) is None:
        raise SystemExit(f"README.md lacks the {START} ... {END} markers")
    head, rest = text.split(START, 1)
    README.write_text(f"{head}{START}\n{block}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote the StyleDrop block into {README.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
