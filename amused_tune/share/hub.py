"""Share a finished run: the model card (OUTPUT_DIR/README.md) and `amused-tune push`.

  amused-tune push OUTPUT_DIR --repo-id user/name [--private] [--token-from-env] [--dry-run]

`finish_run(out, recipe)` runs at the end of every training run (`outputs.write_final`): it writes the model card
(`amused_tune.share.card`) and, with `output.push_to_hub: true`, pushes.

`push(out, repo_id)` creates the repo (or reuses one the token can write to) and uploads, in ONE commit, exactly:

  LoRA runs:  adapter/*.safetensors|json -> repo root (pytorch_lora_weights.safetensors, adapter_config.json,
              adapter_model.safetensors, text_encoder/...), so `--adapter user/name`, diffusers and peft find them
  full runs:  transformer/*.safetensors|json -> transformer/
  always:     README.md, recipe.yaml, loss.png, samples/step-N.png

Nothing else goes up: never checkpoints/, caches, optimizer state, logs or metrics. The token is only ever sent
in the Authorization header; a file that contains it is refused. A failure (no token, no network, a repo owned by
someone else) is one line on stderr, exit 2, and leaves the run folder as it was.

This module imports no torch: `amused-tune push` starts in about a second.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from amused_tune.common import PEFT_CONFIG, RECIPE_FILE
from amused_tune.writes import WriteError, as_write_error, describe, is_write_failure, what_failed, write_file
from amused_tune.share.card import (CARD, DIFFUSERS_FILE, MARKER, REPO_ID, final_metrics, render_card,  # noqa: F401
                                    sample_grids, write_card)

WEIGHT_SUFFIXES = (".safetensors", ".json")


class HubError(RuntimeError):
    """A push that cannot happen; the message is one line that says what to do."""


def read_recipe(out: Path) -> dict:
    """The run's resolved recipe (recipe.yaml) as plain data."""
    path = Path(out) / RECIPE_FILE
    if not path.is_file():
        raise HubError(f"{out} has no recipe.yaml: pass the output.dir of an amused-tune run")
    return yaml.safe_load(path.read_text()) or {}


def finish_run(out: Path, recipe: dict) -> dict:
    """End of a training run (called by `outputs.write_final`): write the card; push when output.push_to_hub.

    A failed push does not fail the run: the weights and card are on disk, the reason is printed as one line and
    returned under "push_error" (for the training command's exit status), and `amused-tune push` retries it.
    """
    written: dict = {}
    card = write_card(out, recipe)
    if card:
        written["card"] = str(card)
    output = recipe.get("output") or {}
    if output.get("push_to_hub"):
        repo_id = output.get("hub_repo_id")
        try:
            written["pushed"] = push(out, repo_id, private=bool(output.get("hub_private")))["url"]
        except HubError as err:
            written["push_error"] = f"{err}; retry with: amused-tune push {out} --repo-id {repo_id}"
            print(f"amused-tune: error: {written['push_error']}", file=sys.stderr)
    return written


# --------------------------------------------------------------------------------------------- push


def upload_plan(out: Path, recipe: dict) -> list[tuple[str, Path]]:
    """(path in the repo, local file) of everything a push uploads, the card excepted. An allow-list."""
    out = Path(out)
    full = (recipe.get("adapter") or {}).get("kind") == "full"
    plan: list[tuple[str, Path]] = []
    folder, prefix = (out / "transformer", "transformer/") if full else (out / "adapter", "")
    marker = folder / ("config.json" if full else PEFT_CONFIG)
    if not (marker.is_file() or (folder / DIFFUSERS_FILE).is_file()):
        raise HubError(f"{out} has no {folder.name}/: is the run finished? (the final weights are written when "
                       "training reaches train.max_steps)")
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            plan.append((prefix + path.relative_to(folder).as_posix(), path))
    for name in (RECIPE_FILE, "loss.png"):
        if (out / name).is_file():
            plan.append((name, out / name))
    plan += [(rel, out / rel) for _, rel in sample_grids(out)]
    return plan


def card_for_push(out: Path, recipe: dict, repo_id: str) -> tuple[bytes, bool]:
    """The README.md to upload, and whether it was (re)generated. A hand-edited card goes up as it is."""
    path = Path(out) / CARD
    if path.is_file() and MARKER not in path.read_text(errors="replace"):
        return path.read_bytes(), False
    return render_card(out, recipe, repo_id).encode(), True


def resolve_token(token: str | None = None, from_env: bool = False) -> str:
    if token:
        return token
    if from_env:
        token = os.environ.get("HF_TOKEN", "").strip()
        if not token:
            raise HubError("--token-from-env: the HF_TOKEN environment variable is not set")
        return token
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HubError("no Hugging Face token: run `hf auth login`, or set HF_TOKEN and pass --token-from-env")
    return token


def _contains(path: Path, needle: bytes, chunk: int = 1 << 20) -> bool:
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-(len(needle) - 1):] if len(needle) > 1 else b""
    return False


def push(out: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
         token_from_env: bool = False, dry_run: bool = False) -> dict:
    """Upload a finished run in one commit. Returns {"url", "files"}; raises HubError with a one-line reason."""
    out = Path(out)
    if not REPO_ID.match(repo_id or ""):
        raise HubError(f"--repo-id {repo_id!r} must look like user/name (letters, digits, '-', '_', '.')")
    if not out.is_dir():
        raise HubError(f"{out} is not a folder: pass the output.dir of an amused-tune run")
    recipe = read_recipe(out)
    plan = upload_plan(out, recipe)
    card, regenerated = card_for_push(out, recipe, repo_id)
    files = sorted([CARD] + [p for p, _ in plan])
    if dry_run:
        return {"url": None, "files": files}
    secret = resolve_token(token, token_from_env)
    needle = secret.encode()
    leaking = [rel for rel, path in plan if _contains(path, needle)] + ([CARD] if needle in card else [])
    if leaking:
        raise HubError(f"refusing to push: {', '.join(leaking)} contain(s) your Hub token; remove it first")
    try:
        url = _upload(out, repo_id, private, secret, plan, card, recipe)
    except HubError:
        raise
    except Exception as err:  # noqa: BLE001 - every failure becomes one line; the run folder is untouched
        raise HubError(_describe(err, repo_id, out).replace(secret, "***")) from None
    if regenerated:  # the local card now shows the Hub id, as the uploaded one does
        try:
            write_file(out / CARD, card, "the model card")
        except WriteError as err:  # the Hub has the run; only the local copy of its card is behind
            print(f"warning: pushed, but the local {CARD} was not updated: {what_failed(err)}", file=sys.stderr)
    return {"url": url, "files": files}


def _upload(out: Path, repo_id: str, private: bool, token: str, plan, card: bytes, recipe: dict) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card)]
    operations += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in plan]
    final = final_metrics(out)
    kind = (recipe.get("adapter") or {}).get("kind", "lora")
    message = f"amused-tune: {kind} run {out.resolve().name}" + (f" at step {final['step']}" if final else "")
    api.create_commit(repo_id, operations, commit_message=message, repo_type="model",
                      commit_description="Uploaded with `amused-tune push`: weights, model card, samples, "
                                         "loss curve and the resolved recipe.")
    return str(repo_url)


def _describe(err: Exception, repo_id: str, out: Path) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    unchanged = f"the run in {out} is unchanged"
    if isinstance(err, OfflineModeIsEnabled):
        return f"HF_HUB_OFFLINE is set: unset it to push ({unchanged})"
    response = getattr(err, "response", None)
    if isinstance(err, HfHubHTTPError) and response is not None:
        code = response.status_code
        if code == 401:
            return (f"the Hub at {constants.ENDPOINT} rejected the token (401 Unauthorized): run `hf auth login` "
                    f"or set a valid HF_TOKEN ({unchanged})")
        if code == 403:
            return (f"no write access to {repo_id} (403 Forbidden): it belongs to another user or organization, "
                    f"or the token is read-only; push to a repo in your own namespace ({unchanged})")
        server = (getattr(err, "server_message", None) or str(err)).strip().splitlines()[0]
        return f"the Hub refused the push to {repo_id} ({code}): {server} ({unchanged})"
    if is_write_failure(err):  # the Hub library's local files (its cache, staged uploads): a disk, not the network
        return describe(as_write_error(err, err.filename or constants.HF_HOME, "the Hub library's local files"),
                        elsewhere="point HF_HOME at another disk", rerun="rerun `amused-tune push`") + f" ({unchanged})"
    if isinstance(err, (OSError, ConnectionError)) or "Connect" in type(err).__name__ or "Timeout" in type(err).__name__:
        return (f"cannot reach the Hub at {constants.ENDPOINT} ({type(err).__name__}): check the network or "
                f"HF_ENDPOINT and rerun `amused-tune push` ({unchanged})")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"push to {repo_id} failed: {type(err).__name__}: {first} ({unchanged})"
