"""The predicted peak GPU memory of every shipped recipe, written into the README (and the recipe headers).

    python bench/memory_table.py                    # rewrite the README's recipes table and its "fits" table
    python bench/memory_table.py --update-recipes   # also write `# predicted peak: X GB` into each recipe header
    python bench/memory_table.py --print            # print the tables, write nothing

The predictions come from `amused_tune.memory.estimate.estimate` (no GPU, no weights: about a second per new setup after
the imports). The recipes table shows, per recipe, the paper's figure, the reference trainer's measured peak
(bench/reference_h100.yaml, where the paper's configuration was measured), the prediction and, once a GPU run
has written it (bench/train.py --update-recipes), the kit's measured peak. The "fits" table says for 6, 8, 12
and 16 GB cards whether each recipe fits as shipped, fits with `--max-memory` (and how), or does not.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amused_tune.memory import estimate as memory

from amused_tune.memory import fit as memory_fit  # noqa: E402
from amused_tune.cli.args import parse_recipe  # noqa: E402
from amused_tune.cli.recipes import list_recipes  # noqa: E402

README = ROOT / "README.md"
REFERENCE = ROOT / "bench" / "reference_h100.yaml"
CARDS = {"amused-256": "nouns_256", "amused-512": "minecraft_512"}
BUDGETS_GB = (6, 8, 12, 16)
MARKS = {"recipes": ("<!-- recipes-table: bench/memory_table.py -->", "<!-- /recipes-table -->"),
         "fits": ("<!-- fits-table: bench/memory_table.py -->", "<!-- /fits-table -->")}
PREDICTED_RE = re.compile(r"^#\s*predicted peak:.*$", re.MULTILINE)


def reference_gb() -> dict[str, float]:
    """Recipe name -> the reference trainer's measured peak (GB) for the same configuration."""
    out = {}
    for base, rows in yaml.safe_load(REFERENCE.read_text())["trainer"].items():
        for key, row in rows.items():
            mode, bs, ga = re.fullmatch(r"(\w+?)_bs(\d+)_ga(\d+)", key).groups()
            out[f"{CARDS[base]}_{mode}_bs{bs}x{ga}"] = row["peak_gb"]
    return out


def mode(recipe) -> str:
    if recipe.adapter.kind == "lora":
        text = f"LoRA r{recipe.adapter.rank}/α{recipe.adapter.alpha:g}"
    else:
        text = "full"
    return text + (", 8-bit Adam" if recipe.optim.adam_8bit else "")


def gb(value) -> str:
    return "—" if value is None else str(value)


def lr(value: float) -> str:
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:.1e}")  # 1.0e-4, as the recipes write it


def fits(recipe, budget_gb: int) -> str:
    """yes (as shipped), the --max-memory changes that make it fit, or no."""
    budget = budget_gb * memory.GB
    if memory.estimate(recipe).peak_bytes <= budget - memory.CUDA_CONTEXT_GB * memory.GB:
        return "yes"
    try:
        fitted = memory_fit.fit(recipe, budget, say=lambda line: None)
    except memory.EstimateError:
        return "no"
    a, b = recipe, fitted
    changes = [label for label, changed in [
        ("bf16 weights", a.model.dtype != b.model.dtype), ("cache", a.data.cache != b.data.cache),
        ("checkpointing", a.train.grad_checkpointing != b.train.grad_checkpointing),
        ("8-bit Adam", a.optim.adam_8bit != b.optim.adam_8bit),
        (f"{b.model.quantize} base", a.model.quantize != b.model.quantize),
        (f"{b.train.batch_size} × {b.train.grad_accum}", a.train.batch_size != b.train.batch_size)] if changed]
    return "`--max-memory`: " + ", ".join(changes)


def collect() -> list[dict]:
    rows, errors = list_recipes()
    for message in errors:
        print(f"skipped recipe {message}", file=sys.stderr)
    ref = reference_gb()
    out, own = [], []
    for row in rows:  # the paper's configurations, then the recipes for your own data on a real-size base
        recipe = parse_recipe([row["file"]])[0]
        try:
            est = memory.estimate(recipe)
        except memory.EstimateError:  # the tiny / toy models: not sized
            continue
        item = {"row": row, "recipe": recipe, "predicted": round(est.peak_gb, 2), "ref": ref.get(row["name"])}
        (out if row["paper_memory_gb"] is not None else own).append(item)
        print(f"{row['name']}: {est.peak_gb:.2f} GB predicted", file=sys.stderr, flush=True)
    return out + own


def recipes_table(items: list[dict]) -> str:
    lines = ["| recipe | base | mode | batch × accum | lr | paper GB | reference GB | predicted GB | measured GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for it in items:
        r, rec = it["row"], it["recipe"]
        lines.append(f"| `{r['name']}` | {rec.model.base} | {mode(rec)} | {rec.train.batch_size} × "
                     f"{rec.train.grad_accum} | {lr(rec.optim.lr)} | {gb(r['paper_memory_gb'])} | {gb(it['ref'])} | "
                     f"{it['predicted']:.2f} | {gb(r['measured_memory_gb'])} |")
    return "\n".join(lines)


def fits_table(items: list[dict]) -> str:
    lines = ["| recipe | predicted GB | " + " | ".join(f"{b} GB" for b in BUDGETS_GB) + " |",
             "|---|---|" + "---|" * len(BUDGETS_GB)]
    for it in items:
        cells = [fits(it["recipe"], b) for b in BUDGETS_GB]
        lines.append(f"| `{it['row']['name']}` | {it['predicted']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, name: str, table: str) -> str:
    start, end = MARKS[name]
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the {start} ... {end} markers around the {name} table")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


def update_recipe(path: Path, predicted: float) -> bool:
    """Write (or rewrite) `# predicted peak: X GB (...)` right after the header's `# paper:` line."""
    text = path.read_text()
    line = f"# predicted peak: {predicted:.2f} GB (amused-tune {path.name} --estimate; bench/memory_table.py)"
    if PREDICTED_RE.search(text):
        new = PREDICTED_RE.sub(line, text, count=1)
    else:
        new, n = re.subn(r"^(#\s*paper:.*)$", lambda m: m.group(1) + "\n" + line, text, count=1, flags=re.MULTILINE)
        if not n:  # no paper line: after the first comment line
            first, _, rest = text.partition("\n")
            new = f"{first}\n{line}\n{rest}"
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--update-recipes", action="store_true", help="also write `# predicted peak:` into recipe headers")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the tables, write nothing")
    args = p.parse_args(argv)
    items = collect()
    recipes, fitting = recipes_table(items), fits_table(items)
    print(recipes + "\n\n" + fitting)
    if args.print_only:
        return 0
    README.write_text(replace_block(replace_block(README.read_text(), "recipes", recipes), "fits", fitting))
    print(f"wrote the recipes and fits tables into {README.relative_to(ROOT)}", file=sys.stderr)
    if args.update_recipes:
        changed = sum(update_recipe(Path(it["row"]["file"]), it["predicted"]) for it in items)
        print(f"updated the predicted peak of {changed} recipes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
