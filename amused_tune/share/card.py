"""The model card of a run: OUTPUT_DIR/README.md, written at the end of every run and uploaded by `amused-tune push`.

YAML front matter the Hub indexes: base_model, library_name (diffusers), license (the base model's), tags (amused,
lora or full-fine-tune, text-to-image, styledrop for single-image runs), instance_prompt (StyleDrop: data.prompt),
datasets (Hub data), widget (the validation grids samples/step-N.png, newest first). The body: what was trained on
which data, the sample grid, the final loss and step (metrics.jsonl), the recipe's key values, and how to use it with
`amused-tune sample`, with diffusers (`AmusedLoraLoaderMixin`, since `AmusedPipeline` has no `load_lora_weights`) and
with peft.

A generated card carries `MARKER` as its first body line; a card whose marker was deleted is the user's and is never
overwritten. No torch import here.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import yaml

from amused_tune.common import DIFFUSERS_FILE, METRICS_FILE
from amused_tune.data.cards import DataError, card_path, load_card
from amused_tune.model.sampling_defaults import DIFFUSERS_DEFAULTS, describe_taken, resolve_sampling
from amused_tune.writes import write_file

CARD = "README.md"
MARKER = ("<!-- written by amused-tune; `amused-tune push` refreshes this card. "
          "Delete this line to keep your own edits. -->")
BASE_LICENSES = {"amused/amused-256": "openrail++", "amused/amused-512": "openrail++", "tiny": "apache-2.0",
                 "toy": "apache-2.0"}
BUILT_IN_BASES = ("tiny", "toy")
EVAL_SECTION = "eval.md"  # a run's measured results in Markdown, written by an evaluation; the card includes it
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_WIDGETS = 4
SMOOTH_STEPS = 10  # the final loss reported is the mean of this many last steps: one step's loss is noisy


# --------------------------------------------------------------------------------------------- reading a run


def final_metrics(out: Path) -> dict | None:
    """Step and loss of the last optimizer step in metrics.jsonl (rows without `lr` were skipped steps), and the
    loss smoothed: `loss_mean`, the mean over the last `mean_of` (up to SMOOTH_STEPS) logged steps."""
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    trained = [r for r in rows if "lr" in r and "loss" in r]
    if not trained:
        return None
    def loss_of(row: dict) -> float:  # a skipped (non-finite) step is logged with "loss": null
        return float("nan") if row["loss"] is None else float(row["loss"])

    last = [loss_of(r) for r in trained[-SMOOTH_STEPS:] if math.isfinite(loss_of(r))]
    return {"step": int(trained[-1]["step"]), "loss": loss_of(trained[-1]),
            "loss_mean": sum(last) / len(last) if last else float("nan"), "mean_of": len(last),
            "skipped": int(trained[-1].get("skipped_nonfinite", 0))}


def heldout_line(out: Path) -> list[str]:
    """The held-out loss (validation.holdout) of metrics.jsonl: its lowest value and step, and the last."""
    path = Path(out) / METRICS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    held = [(r["step"], r["heldout_loss"]) for r in rows if r.get("heldout_loss") is not None]
    if not held:
        return []
    best = min(held, key=lambda sl: sl[1])
    return ["", f"Held-out loss (images kept out of training, fixed masks): lowest **{best[1]:.4f}** at step "
                f"{best[0]}, {held[-1][1]:.4f} at step {held[-1][0]}"
                + (" (risen since: the run overfits after its minimum)." if held[-1][1] > best[1] else ".")]


def sample_grids(out: Path) -> list[tuple[int, str]]:
    """(step, "samples/step-N.png") of the validation grids, oldest first."""
    grids = []
    for path in (Path(out) / "samples").glob("step-*.png"):
        match = re.fullmatch(r"step-(\d+)\.png", path.name)
        if match and path.is_file():
            grids.append((int(match[1]), f"samples/{path.name}"))
    return sorted(grids)


def dataset_card(data: dict) -> dict:
    """The dataset card named by data.card (a name in datasets_cards/ or $AMUSED_TUNE_CARDS, or a path); {} if none."""
    name = str(data.get("card") or "")
    if not name:
        return {}
    try:
        return {"name": card_path(name).stem, **load_card(name)}
    except (DataError, OSError):
        return {"name": name}


def resolved_data(data: dict) -> dict:
    """The data section as training saw it: the recipe's values over its dataset card's (as data.resolve_config)."""
    card = dataset_card(data)
    return {**card, **{k: v for k, v in data.items() if v is not None}, "_card": card}


def base_license(base: str) -> str:
    if base in BASE_LICENSES:
        return BASE_LICENSES[base]
    readme = Path(base).expanduser() / CARD
    if readme.is_file():  # a local pipeline folder with its own card
        meta = _front_matter(readme.read_text())
        if isinstance(meta.get("license"), str):
            return meta["license"]
    return "other"


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    try:
        meta = yaml.safe_load(match[1]) if match else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


# --------------------------------------------------------------------------------------------- rendering


ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA (weight-decomposed LoRA)", "lokr": "LoKr (peft)",
                 "loha": "LoHa (peft)"}  # what the card calls each adapter.kind

def card_metadata(recipe: dict, out: Path) -> dict:
    """The YAML front matter: the fields the Hub indexes."""
    model, adapter = recipe.get("model") or {}, recipe.get("adapter") or {}
    data, validation = resolved_data(recipe.get("data") or {}), recipe.get("validation") or {}
    base = str(model.get("base") or "amused/amused-256")
    kind = adapter.get("kind", "lora")
    lora = kind != "full"  # an adapter: lora, dora, lokr or loha
    styledrop = data.get("source") == "single_image"
    tags = ["amused", "lora" if lora else "full-fine-tune", "text-to-image", "diffusers", "amused-tune"]
    tags += [kind] if kind in ADAPTER_NAMES and kind != "lora" else []
    if styledrop:
        tags.append("styledrop")
    meta: dict = {"base_model": base, "library_name": "diffusers", "license": base_license(base), "tags": tags}
    if styledrop and data.get("prompt"):
        meta["instance_prompt"] = str(data["prompt"])
    if data.get("source") == "hub" and data.get("path"):
        meta["datasets"] = [str(data["path"])]
    prompts = [str(p) for p in validation.get("prompts") or []]
    widgets = []
    for step, path in reversed(sample_grids(out)[-MAX_WIDGETS:]):
        text = " | ".join(prompts) if prompts else f"validation grid at step {step}"
        widgets.append({"text": text, "output": {"url": path}})
    if widgets:
        meta["widget"] = widgets
    return meta


def render_card(out: Path, recipe: dict, repo_id: str | None = None) -> str:
    """The whole README.md. Code examples point at `repo_id` when given, else at the local run folder."""
    out = Path(out)
    recipe = json.loads(json.dumps(recipe, default=str))
    meta = card_metadata(recipe, out)
    adapter = recipe.get("adapter") or {}
    data = resolved_data(recipe.get("data") or {})
    validation = recipe.get("validation") or {}
    kind = adapter.get("kind", "lora")
    base, lora = meta["base_model"], kind != "full"
    name = repo_id.split("/")[-1] if repo_id else out.resolve().name
    source = repo_id or str(out / "adapter" if lora else out)
    prompt = meta.get("instance_prompt") or next(iter(validation.get("prompts") or []), "a photo of a cat")
    dcard = data["_card"]

    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000).strip(), "---", MARKER, ""]
    lines.append(f"# {name}")
    lines.append("")
    what = (f"A {ADAPTER_NAMES.get(kind, kind)} (rank {adapter.get('rank')}, alpha {adapter.get('alpha')}, on "
            f"{', '.join(adapter.get('targets') or [])}{' and the CLIP text encoder' if adapter.get('text_encoder') else ''})"
            if lora else "A full fine-tune of the U-ViT")
    lines.append(f"{what} for {_model_link(base)}, trained with amused-tune "
                 f"on {_data_description(data, dcard)}.")
    if meta.get("instance_prompt"):
        lines += ["", f"StyleDrop: trained on a single image captioned `{meta['instance_prompt']}`; put the same "
                      "style words in your prompts."]
    if base in BUILT_IN_BASES:
        lines += ["", f"The base `{base}` is built into amused-tune (`amused_tune.model.bases.load_components({base!r})`), "
                      "not a Hub model: this repository is a test artifact."]
    if dcard.get("license") or dcard.get("licence"):
        lines += ["", f"Training data licence: {dcard.get('license') or dcard.get('licence')}."]

    lines += ["", "## Samples", ""] + _samples_lines(out, base, validation)
    lines += ["", "## Training", ""] + _training_lines(out, recipe, data, lora)
    section = Path(out) / EVAL_SECTION  # measured results an evaluation wrote (e.g. python -m amused_tune.toy eval)
    if section.is_file():
        lines += ["", *section.read_text().strip("\n").splitlines()]
    lines += ["", "## Use it", ""] + _recorded_lines(out, lora) + _pixel_art_lines(out, lora)
    lines += _usage(base, source, prompt, lora, bool(adapter.get("text_encoder")), repo_id, _call_settings(out, lora),
                    diffusers_loads=kind in ("lora", "dora"))
    return "\n".join(lines) + "\n"


def _samples_lines(out: Path, base: str, validation: dict) -> list[str]:
    """The newest validation grid and how it was sampled."""
    grids = sample_grids(out)
    if not grids:
        return ["No validation grid was written (the recipe has no validation.prompts)."]
    step, path = grids[-1]
    sampling, taken = resolve_sampling(base, **{k: validation.get(k) for k in DIFFUSERS_DEFAULTS})
    return [f"![validation grid at step {step}]({path})", "",
            f"Validation grid at step {step}: prompts {', '.join(f'`{p}`' for p in validation.get('prompts') or [])}; "
            f"{sampling_words(sampling)}; seeds from {validation.get('seed')} (also in the PNG's "
            f"text chunks){'; ' + describe_taken(base, taken) if taken else ''}."]


def sampling_words(sampling: dict) -> str:
    """Every sampling setting in words: guidance and its schedule, steps, temperature, min_p, top_k."""
    temperature = sampling.get("temperature")
    shown = " -> ".join(map(str, temperature)) if isinstance(temperature, (list, tuple)) else temperature
    return (f"{sampling.get('steps')} MaskGIT steps, guidance {sampling.get('guidance')} "
            f"({sampling.get('guidance_schedule')} schedule), temperature {shown}, min_p {sampling.get('min_p')}, "
            f"top_k {sampling.get('top_k')}")


def diffusers_gap(sampling: dict) -> list[str]:
    """What plain diffusers' AmusedPipeline cannot apply of `sampling` (it takes guidance_scale,
    num_inference_steps and temperature; it has no truncation and no guidance schedule), as one paragraph."""
    missing = []
    if sampling.get("min_p"):
        missing.append(f"`min_p` {sampling['min_p']} (a token less likely than that share of the likeliest one "
                       "is never drawn)")
    if sampling.get("top_k"):
        missing.append(f"`top_k` {sampling['top_k']} (only the likeliest tokens are drawn)")
    if sampling.get("guidance_schedule") not in (None, "constant"):
        missing.append(f"the `{sampling['guidance_schedule']}` guidance schedule (it guides at one constant scale)")
    if not missing:
        return ["Plain diffusers' `AmusedPipeline` applies all of these: the calls below pass guidance, steps and "
                "temperature.", ""]
    return ["Plain diffusers' `AmusedPipeline` takes guidance, steps and temperature (the calls below pass them) but "
            f"cannot apply {' and '.join(missing)}: without that truncation its samples differ from the validation "
            "grids (on a small base such as the toy, a few stray cells per image). `amused-tune sample` (and a "
            "pipeline folder from `amused-tune merge`, sampled with `amused-tune sample --base`) applies every "
            "setting.", ""]


def _recorded_lines(out: Path, lora: bool) -> list[str]:
    """What the weights record about their base and sampling settings (amused_tune.json beside them)."""
    from amused_tune.model.provenance import INFO_FILE, read_record

    record = read_record(out / ("adapter" if lora else "transformer"))
    sampling = (record or {}).get("sampling")
    if not record or not sampling:
        return []
    return [f"The weights record the base they were trained on (`{record['base']}`) and the sampling settings "
            f"they were validated with ({sampling_words(sampling)}) in `{INFO_FILE}` beside them: "
            f"`amused-tune sample --adapter ...` and `amused-tune merge` use them when you pass no `--base` "
            "and no settings.", "", *diffusers_gap(sampling)]


def _pixel_art_lines(out: Path, lora: bool) -> list[str]:
    """The pixel-art settings the weights record (grid, palette, transparency), which sampling applies by default."""
    from amused_tune.model.provenance import INFO_FILE, read_record
    from amused_tune.sampling.pixel_art import describe

    text = describe((read_record(out / ("adapter" if lora else "transformer")) or {}).get("pixel_art"))
    if not text:
        return []
    return [f"Samples are pixel art: {text} (recorded in `{INFO_FILE}`). `amused-tune sample --adapter ...` writes "
            "each image as that sprite by default (`--no-pixel-art`: the plain image); the validation grids show "
            "the sprites enlarged with nearest-neighbour.", ""]


CARD_KEYS = [("model", "base"), ("model", "resolution"), ("data", "card"), ("data", "source"), ("data", "path"),
             ("adapter", "kind"), ("adapter", "rank"), ("adapter", "alpha"), ("adapter", "targets"),
             ("adapter", "text_encoder"), ("optim", "name"), ("optim", "lr"), ("optim", "adam_8bit"), ("optim", "scheduler"),
             ("optim", "warmup_steps"), ("train", "batch_size"), ("train", "grad_accum"), ("train", "max_steps"),
             ("train", "precision"), ("train", "cond_dropout"), ("train", "seed"), ("train", "ema_decay")]


def _training_lines(out: Path, recipe: dict, data: dict, lora: bool) -> list[str]:
    """The final loss, the loss curve and the recipe keys that define the run."""
    train = recipe.get("train") or {}
    final = final_metrics(out)
    if final:
        skipped = f", {final['skipped']} non-finite steps skipped" if final["skipped"] else ""
        lines = [f"Final loss **{final['loss_mean']:.4f}** (mean of the last {final['mean_of']} steps; the last "
                 f"step's {final['loss']:.4f}) at step **{final['step']}** of {train.get('max_steps')} "
                 f"(masked cross-entropy, metrics.jsonl{skipped})."]
    else:
        lines = ["No metrics were recorded."]
    lines += heldout_line(out)
    if (out / "loss.png").is_file():
        lines += ["", "![loss curve](loss.png)"]
    lines += ["", "| recipe key | value |", "|---|---|"]
    sections = {name: recipe.get(name) or {} for name in ("model", "adapter", "optim", "train")} | {"data": data}
    for section, key in CARD_KEYS:
        value = sections[section].get(key)
        if value is not None and (lora or section != "adapter" or key == "kind"):
            lines.append(f"| {section}.{key} | `{_short(value)}` |")
    return lines + ["", "The full resolved recipe, with package versions, is [recipe.yaml](recipe.yaml): "
                        "`amused-tune recipe.yaml` reruns it."]


def _model_link(base: str) -> str:
    if REPO_ID.match(base) and not Path(base).expanduser().exists():
        return f"[{base}](https://huggingface.co/{base})"
    return f"`{base}`"


def _data_description(data: dict, dcard: dict) -> str:
    if dcard:
        text = f"the dataset card `{dcard['name']}`"
        if dcard.get("homepage"):
            text = f"[{text}]({dcard['homepage']})"
        if dcard.get("description"):
            text += f" ({' '.join(str(dcard['description']).split()).rstrip('.')})"
        return text + ("" if data.get("source") == "single_image" else _captions(data))
    if data.get("source") == "single_image":
        return f"one image (`{Path(str(data.get('path'))).name}`)"
    return f"{data.get('source') or 'a'} dataset `{data.get('path')}`{_captions(data)}"


def _captions(data: dict) -> str:
    """Which captions a multi-image source trained on: its own, or data.prompt for every image."""
    if data.get("prompt"):
        return f" (every image captioned `{data['prompt']}`; their own captions set aside)"
    return " (each image with its own captions)"


def _short(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _pipeline(base: str, transformer: bool = False) -> str:
    """The code making `pipe` (with the fine-tuned `transformer` when asked): from the Hub or a folder, or, for a base
    built into amused-tune (tiny, toy), from its components, which are exactly AmusedPipeline's arguments."""
    if base not in BUILT_IN_BASES:
        extra = ", transformer=transformer" if transformer else ""
        return f"pipe = AmusedPipeline.from_pretrained({json.dumps(base)}{extra})"
    parts = f"vars(load_components({json.dumps(base)}))"
    if transformer:
        parts = f'{{**{parts}, "transformer": transformer}}'
    return f"pipe = AmusedPipeline(**{parts})  # {base}: a base built into amused-tune"


def _imports(base: str, *lines: str) -> list[str]:
    """A code block's import lines, with the kit's loader for its built-in bases."""
    return [*lines, *(["from amused_tune.model.bases import load_components"] if base in BUILT_IN_BASES else []), ""]


def _call_settings(out: Path, lora: bool) -> str:
    """The recorded guidance, steps and temperature as AmusedPipeline's call arguments (", guidance_scale=2.0,
    ..."), or "" (min_p and top_k it cannot take: `diffusers_gap`)."""
    from amused_tune.model.provenance import read_record

    sampling = (read_record(Path(out) / ("adapter" if lora else "transformer")) or {}).get("sampling") or {}
    names = {"guidance": "guidance_scale", "steps": "num_inference_steps", "temperature": "temperature"}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in sampling.items()}
    return "".join(f", {names[k]}={values[k]!r}" for k in names if values.get(k) is not None)


def _usage(base: str, source: str, prompt: str, lora: bool, text_encoder: bool, repo_id: str | None,
           settings: str = "", diffusers_loads: bool = True) -> list[str]:
    """The "Use it" section. Strings go into the code as literals (json.dumps / shlex.quote), whatever they hold.
    `diffusers_loads=False` (LoKr, LoHa): no diffusers loader snippet, which would load nothing from the file."""
    py_source, py_prompt = json.dumps(source), json.dumps(prompt)
    sh_base, sh_source, sh_prompt = shlex.quote(base), shlex.quote(source), shlex.quote(prompt)
    if not lora:
        folder = repo_id.split("/")[-1] if repo_id else sh_source
        fetch = f"hf download {repo_id} --local-dir {folder}\n" if repo_id else ""
        return [
            "With amused-tune (fold the fine-tuned U-ViT into a full pipeline folder, then sample):", "", "```bash",
            f"{fetch}amused-tune merge {folder} --out merged\n"
            f"amused-tune sample --base merged --prompt {sh_prompt} --out samples/", "```", "",
            "With diffusers:", "", "```python",
            *_imports(base, "import torch", "from diffusers import AmusedPipeline, UVit2DModel"),
            f'transformer = UVit2DModel.from_pretrained({py_source}, subfolder="transformer")',
            _pipeline(base, transformer=True),
            f"image = pipe({py_prompt}, generator=torch.manual_seed(0){settings}).images[0]",
            'image.save("sample.png")', "```",
        ]
    te_line = ("AmusedLoraLoaderMixin.load_lora_into_text_encoder(\n    state_dict, network_alphas=network_alphas, "
               "text_encoder=pipe.text_encoder, prefix=\"text_encoder\", metadata=metadata\n)\n") if text_encoder else ""
    peft_te = (f"pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, {py_source}, "
               'subfolder="text_encoder").merge_and_unload()\n') if text_encoder else ""
    diffusers = [
        "With diffusers. `AmusedPipeline` has no `load_lora_weights`: load the adapter with the LoRA loader mixin. "
        "`return_lora_metadata=True` keeps `lora_alpha`, so the adapter applies at the strength it was trained at.",
        "", "```python",
        *_imports(base, "import torch", "from diffusers import AmusedPipeline",
                  "from diffusers.loaders import AmusedLoraLoaderMixin"),
        _pipeline(base),
        "state_dict, network_alphas, metadata = AmusedLoraLoaderMixin.lora_state_dict(",
        f'    {py_source}, weight_name="{DIFFUSERS_FILE}", return_lora_metadata=True',
        ")",
        "AmusedLoraLoaderMixin.load_lora_into_transformer(",
        "    state_dict, network_alphas=network_alphas, transformer=pipe.transformer, metadata=metadata",
        ")",
        f"{te_line}image = pipe({py_prompt}, generator=torch.manual_seed(0){settings}).images[0]",
        'image.save("sample.png")', "```", "",
    ] if diffusers_loads else [
        "diffusers' LoRA loader cannot read this adapter (it is in peft's format only): load it with peft, or fold it "
        "into a pipeline folder with `amused-tune merge`.", "",
    ]
    return [
        "With amused-tune:", "", "```bash",
        f"amused-tune sample --base {sh_base} --adapter {sh_source} --prompt {sh_prompt} --out samples/", "```", "",
        *diffusers,
        "With peft (the same adapter in peft's format, `adapter_config.json` + `adapter_model.safetensors`):", "",
        "```python",
        *_imports(base, "from diffusers import AmusedPipeline", "from peft import PeftModel"),
        _pipeline(base),
        f"pipe.transformer = PeftModel.from_pretrained(pipe.transformer, {py_source}).merge_and_unload()",
        f"{peft_te}image = pipe({py_prompt}{settings}).images[0]", "```",
    ]


def write_card(out: Path, recipe: dict, repo_id: str | None = None) -> Path | None:
    """Write OUTPUT_DIR/README.md; a card whose marker line was deleted (edited by hand) is kept as it is."""
    out = Path(out)
    path = out / CARD
    if path.is_file() and MARKER not in path.read_text(errors="replace"):
        return None
    output = recipe.get("output") or {}
    if repo_id is None and output.get("push_to_hub"):
        repo_id = output.get("hub_repo_id")
    return write_file(path, render_card(out, recipe, repo_id), "the model card")
