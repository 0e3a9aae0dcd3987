"""`amused-tune recipes`: list the shipped recipes, print them as JSON, copy one out to edit.

  amused-tune recipes                      table: name, base, mode, batch x accum, lr, paper GB, measured GB
  amused-tune recipes --json               the same as JSON (one object per recipe)
  amused-tune recipes cp NAME DEST.yaml    copy a recipe (comments included) to edit; DEST may be a folder

The memory figures live in each recipe's header comment, so the file is the single source:

  # paper: 6.5 GB (aMUSEd report Table 2, ...)      the peak the aMUSEd report gives for this config
  # measured: 4.1 GB (NVIDIA H100 80GB HBM3, ...)    the kit's peak from bench/train.py, with the GPU's name

A recipe with a `# paper:` line reproduces a row of the report (paper_memory_gb is set in the JSON).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from amused_tune.cli.args import SubcommandParser
from amused_tune.common import kit_path
from amused_tune.writes import write_file

RECIPES_DIR = kit_path("recipes")
PAPER_RE = re.compile(r"^#\s*paper:\s*([0-9]*\.?[0-9]+)\s*GB", re.IGNORECASE)
MEASURED_RE = re.compile(r"^#\s*measured:\s*(.*?)\s*$", re.IGNORECASE)
GB_RE = re.compile(r"^([0-9]*\.?[0-9]+)\s*GB\b\s*(?:\((.*)\))?", re.IGNORECASE)


def recipe_files(recipes_dir: Path = RECIPES_DIR) -> list[Path]:
    return sorted(recipes_dir.glob("*.yaml"))


def header(path: Path) -> list[str]:
    """The comment lines at the top of a recipe file."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def memory_from_header(lines: list[str]) -> dict:
    """paper_memory_gb, measured_memory_gb and measured_note (the text after `# measured:`) from a header."""
    out = {"paper_memory_gb": None, "measured_memory_gb": None, "measured_note": None}
    for line in lines:
        if m := PAPER_RE.match(line):
            out["paper_memory_gb"] = float(m.group(1))
        elif m := MEASURED_RE.match(line):
            out["measured_note"] = m.group(1)
            if gb := GB_RE.match(m.group(1)):
                out["measured_memory_gb"] = float(gb.group(1))
    return out


def describe(path: Path) -> dict:
    """One recipe as a flat dict (the JSON row); the values are the resolved recipe's, defaults filled in."""
    from amused_tune.cli.args import parse_recipe

    recipe, _, _ = parse_recipe([str(path)])
    lora = recipe.adapter.kind == "lora"
    row = {
        "name": path.stem,
        "file": str(path),
        "base": recipe.model.base,
        "resolution": recipe.model.resolution or _native_resolution(recipe.model.base),
        "adapter_kind": recipe.adapter.kind,
        "lora_rank": recipe.adapter.rank if lora else None,
        "lora_alpha": recipe.adapter.alpha if lora else None,
        "batch_size": recipe.train.batch_size,
        "grad_accum": recipe.train.grad_accum,
        "lr": recipe.optim.lr,
        "adam_8bit": recipe.optim.adam_8bit,
        "max_steps": recipe.train.max_steps,
        "precision": recipe.train.precision,
        "model_dtype": recipe.model.dtype,
        "quantize": recipe.model.quantize,
        "grad_checkpointing": recipe.train.grad_checkpointing,
        "data_card": recipe.data.card,
        "description": _description(header(path)),
    }
    row.update(memory_from_header(header(path)))
    return row


def _native_resolution(base: str) -> int | None:
    """256 / 512 for the aMUSEd Hub bases when a recipe leaves model.resolution to the base (null)."""
    m = re.search(r"amused-(256|512)$", base)
    return int(m.group(1)) if m else None


def _description(lines: list[str]) -> str:
    """The header's first sentence(s): the comment lines before the first `key: value` line."""
    text = []
    for line in lines:
        body = line.lstrip("#").strip()
        if re.match(r"^(paper|measured|data card|command)\s*:", body, re.IGNORECASE):
            break
        text.append(body)
    return " ".join(text)


def list_recipes(recipes_dir: Path = RECIPES_DIR) -> tuple[list[dict], list[str]]:
    """(rows, errors): every recipe that parses, and one message per recipe that does not."""
    rows, errors = [], []
    for path in recipe_files(recipes_dir):
        try:
            rows.append(describe(path))
        except ValueError as err:  # RecipeError and jsonargparse errors: list the others, report this one
            errors.append(f"{path.name}: {err}")
    return sorted(rows, key=_order), errors


def _order(row: dict) -> tuple:
    """Paper recipes first (by resolution, mode, batch descending, as the report's tables), then the others."""
    modes = {"full": 0, "lora": 2}
    kind = modes.get(row["adapter_kind"], 3) - (1 if row["adapter_kind"] == "full" and not row["adam_8bit"] else 0)
    return (row["paper_memory_gb"] is None, row["resolution"] or 0, row["name"].startswith("styledrop"), kind,
            -row["batch_size"], row["name"])


def mode(row: dict) -> str:
    if row["adapter_kind"] == "lora":
        text = f"LoRA r{row['lora_rank']}/a{_num(row['lora_alpha'])}"
        if row.get("quantize"):
            text += f" {row['quantize']} base"
    else:
        text = "full"
    return text + (" 8-bit Adam" if row["adam_8bit"] else "")


def _num(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def table(rows: list[dict]) -> str:
    head = ["name", "base", "mode", "batch x accum", "lr", "paper GB", "measured GB"]
    body = [
        [
            r["name"], r["base"], mode(r), f"{r['batch_size']} x {r['grad_accum']}", f"{r['lr']:.1e}",
            "—" if r["paper_memory_gb"] is None else _num(r["paper_memory_gb"]),
            "—" if r["measured_memory_gb"] is None else _num(r["measured_memory_gb"]),
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in body]
    measured = [r for r in rows if r["measured_memory_gb"] is not None]
    if not measured:
        lines.append("measured GB: not measured yet (run bench/train.py on a GPU)")
    return "\n".join(lines)


def find(name: str, recipes_dir: Path = RECIPES_DIR) -> Path:
    stem = Path(name).name.removesuffix(".yaml")
    path = recipes_dir / f"{stem}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in recipe_files(recipes_dir))
        raise FileNotFoundError(f"no recipe named {name!r}; the shipped recipes are: {known}")
    return path


def copy(name: str, dest: str, force: bool = False, recipes_dir: Path = RECIPES_DIR) -> Path:
    """Copy a shipped recipe to `dest` (a file, or a folder to copy into); the header's command names the copy."""
    src = find(name, recipes_dir)
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists: pick another destination or pass --force to overwrite it")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise FileExistsError(f"cannot write {target}: {blocking} is a file, not a folder; pick another destination")
    text = src.read_text()
    text = re.sub(r"^(#\s*command:\s*amused-tune\s+)\S+", lambda m: m.group(1) + str(target), text, count=1,
                  flags=re.MULTILINE)
    text = own_output_dir(text, src.stem, target.stem)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_file(target, text, "the recipe")


OUTPUT_DIR_RE = re.compile(r"^output:[^\n]*\n(?:(?:[ \t]+[^\n]*)?\n)*?[ \t]+dir:[ \t]*([^#\n]*?)[ \t]*(?:#.*)?$",
                           re.MULTILINE)


def own_output_dir(text: str, old: str, new: str) -> str:
    """The recipe text with `output.dir` named after the copy: `runs/quickstart-{adapter.kind}` copied to
    my_style.yaml becomes `runs/my_style-{adapter.kind}`, and the comments' `runs/quickstart...` follow, so the
    copy's first run does not stop on the folder of the recipe it came from."""
    found = OUTPUT_DIR_RE.search(text)
    if old == new or not found:
        return text
    value = found[1].strip("'\"")
    parent, _, leaf = value.rpartition("/")
    leaf = new + leaf[len(old):] if leaf.startswith(old) else new
    fresh = f"{parent}/{leaf}" if parent else leaf
    quoted = fresh if re.fullmatch(r"[\w./{}-]+", fresh) else json.dumps(fresh)  # spaces or YAML's own characters
    text = text[:found.start(1)] + quoted + text[found.end(1):]
    if parent:  # the comments that name the old folder (`# ... runs/quickstart-lora/samples ...`)
        text = re.sub(rf"(?<![\w/]){re.escape(f'{parent}/{old}')}(?!\w)", f"{parent}/{new}", text)
    return text


def build_parser() -> SubcommandParser:
    parser = SubcommandParser(
        prog="amused-tune recipes", description="The shipped recipes (recipes/ next to the package).",
        epilog="amused-tune recipes cp NAME DEST.yaml copies one out to edit.",
    )
    parser.add_argument("--json", action="store_true", help="print the recipes as JSON")
    sub = parser.add_subparsers(dest="command")
    cp = sub.add_parser("cp", help="copy a recipe to edit it")
    cp.add_argument("name", help="recipe name, e.g. nouns_256_lora_bs1x16")
    cp.add_argument("dest", help="destination file (or folder)")
    cp.add_argument("--force", action="store_true", help="overwrite an existing destination")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, code = build_parser().parse_or_exit_code(argv)
    if args is None:
        return code
    if args.command == "cp":
        try:
            target = copy(args.name, args.dest, args.force)
        except (FileNotFoundError, FileExistsError) as err:
            print(f"amused-tune recipes: error: {err}", file=sys.stderr)
            return 2
        import yaml

        out = ((yaml.safe_load(target.read_text()) or {}).get("output") or {}).get("dir")
        print(f"copied {args.name} to {target}" + (f" (its runs go to output.dir: {out})" if out else "")
              + f"; edit it, then train with: amused-tune {shlex.quote(str(target))}")
        return 0
    rows, errors = list_recipes()
    for message in errors:
        print(f"amused-tune recipes: warning: skipped {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
    return 1 if errors else 0
