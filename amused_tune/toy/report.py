"""The model card's section for a run on the toy base: the rates `python -m amused_tune.toy eval --adapter` wrote to
RUN_DIR/eval.json, base against fine-tuned, only the rows of what the run teaches (a style run: the style rows and
where the style is missing, by background colour; a concept run: the concept row). Torch-free (the card is written
without torch)."""

from __future__ import annotations

import json
from pathlib import Path

ROWS = (("world", "world prompts: shape, colour and background match"),
        ("concept", "new concept (purple) in combinations the fine-tuning set left out"),
        ("style_with", "`... in [v] style`: the style is drawn"),
        ("style_match", "`... in [v] style`: the style and the caption are drawn"),
        ("style_without", "prompts without `[v] style`: the style is drawn (leak)"))


def eval_lines(out: Path) -> list[str]:
    """Markdown lines (a heading and a table, and for a style run the table by background) from
    OUTPUT_DIR/eval.json; [] when the run has none."""
    path = Path(out) / "eval.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    runs = [("base", data["base"]), ("fine-tuned", data["adapter"])]
    if "adapter_styledrop" in data:
        sd = data["adapter_styledrop"]
        runs.append((f"fine-tuned, StyleDrop guidance ({sd['lambda_a']:g}, {sd['lambda_b']:g})", sd))
    s = data.get("sampling", {})
    lines = ["", "## Measured on the toy world", "",
             f"Share of samples the toy's exact classifier reads as asked ({sampling_words(s)}; "
             "`python -m amused_tune.toy eval --adapter RUN_DIR`):", "",
             "| | " + " | ".join(name for name, _ in runs) + " |", "|---|" + "---|" * len(runs)]
    for key, label in ROWS:
        if all(isinstance(r.get(key), (int, float)) for _, r in runs):  # the rows of what the run teaches
            lines.append(f"| {label} | " + " | ".join(f"{r[key]:.2f}" for _, r in runs) + " |")
    lines += background_lines(runs[1:])
    return lines


def sampling_words(s: dict) -> str:
    words = [f"guidance {s.get('guidance')}", f"{s.get('steps')} steps"]
    if s.get("min_p"):
        words.append(f"min_p {s['min_p']:g}")
    if s.get("top_k"):
        words.append(f"top_k {s['top_k']}")
    return ", ".join(words)


def background_lines(tuned: list[tuple[str, dict]]) -> list[str]:
    """The style by background colour of the prompt, for each fine-tuned column that measured it."""
    tuned = [(name, r["style_by_background"]) for name, r in tuned if r.get("style_by_background")]
    if not tuned:
        return []
    backgrounds = list(tuned[0][1])
    lines = ["", "`... in [v] style` by the background colour the prompt asks for (style drawn / style and caption "
             "drawn, of n samples): where the style is missing.", "",
             "| background | " + " | ".join(name for name, _ in tuned) + " |", "|---|" + "---|" * len(tuned)]
    for bg in backgrounds:
        cells = []
        for _, rows in tuned:
            r = rows.get(bg)
            cells.append(f"{r['style_with']:.2f} / {r['style_match']:.2f} (n={r['samples']})" if r else "")
        lines.append(f"| {bg} | " + " | ".join(cells) + " |")
    return lines
