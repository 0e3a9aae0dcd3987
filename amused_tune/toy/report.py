"""The model card's section for a run on the toy base: the rates `python -m amused_tune.toy eval --adapter` wrote to
RUN_DIR/eval.json, base against fine-tuned. Torch-free (the card is written without torch)."""

from __future__ import annotations

import json
from pathlib import Path

ROWS = (("world", "world prompts: shape, colour and background match"),
        ("concept", "new concept (purple) in combinations the fine-tuning set left out"),
        ("style_with", "`... in [v] style`: the style is drawn"),
        ("style_match", "`... in [v] style`: the style and the caption are drawn"),
        ("style_without", "prompts without `[v] style`: the style is drawn (leak)"))


def eval_lines(out: Path) -> list[str]:
    """Markdown lines (a heading and a table) from OUTPUT_DIR/eval.json; [] when the run has none."""
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
             f"Share of samples the toy's exact classifier reads as asked (guidance {s.get('guidance')}, "
             f"{s.get('steps')} steps; `python -m amused_tune.toy eval --adapter RUN_DIR`):", "",
             "| | " + " | ".join(name for name, _ in runs) + " |", "|---|" + "---|" * len(runs)]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{r[key]:.2f}" for _, r in runs) + " |")
    return lines
