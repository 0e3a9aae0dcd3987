"""The model card (OUTPUT_DIR/README.md) and `amused-tune push`, against the fake Hub of tests/helpers.py on 127.0.0.1.

No test reaches the real Hub: every push runs in a subprocess whose HF_ENDPOINT is the local fake server (the
client reads HF_ENDPOINT at import time), with an empty HF_HOME, so no saved token or cache of this machine is used.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from pathlib import Path

import pytest
from conftest import make_images, reset_accelerate
from helpers import TOKEN, FakeHub, Repo, push

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a mushroom in [v] style"
ADAPTER_FILES = {"pytorch_lora_weights.safetensors", "adapter_config.json", "adapter_model.safetensors",
                 "text_encoder/adapter_config.json", "text_encoder/adapter_model.safetensors",
                 "amused_tune.json"}  # the base and sampling settings the adapter was trained and validated with


def train_run(out: Path, data: Path, **overrides):
    """A finished tiny StyleDrop-style LoRA run (U-ViT and text encoder): 2 steps, checkpoints, a cache and
    validation grids in the folder."""
    from amused_tune.recipe import (AdapterConfig, DataConfig, ModelConfig, OptimConfig, OutputConfig, Recipe,
                                    TrainConfig, ValidationConfig)
    from amused_tune.train.loop import train

    recipe = Recipe(
        model=ModelConfig(base="tiny"),
        data=DataConfig(source="single_image", path=str(data / "img0.png"), prompt=PROMPT,
                        cache_dir=str(out / "cache")),
        adapter=AdapterConfig(rank=4, alpha=8, text_encoder=True),
        optim=OptimConfig(lr=1e-2),  # a LoRA that visibly changes the logits after 2 steps
        train=TrainConfig(max_steps=2, precision="fp32", checkpoint_every=1, keep_checkpoints=2),
        validation=ValidationConfig(prompts=[PROMPT, "a house in [v] style"], every=2, steps=2),
        output=OutputConfig(dir=str(out), **overrides),
    )
    return train(recipe)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    out = root / "pixel-run"
    train_run(out, make_images(root / "data", n=1))
    reset_accelerate()
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """A private copy: a successful push refreshes the local card."""
    return Path(shutil.copytree(run_dir, tmp_path / "pixel-run"))


@pytest.fixture
def fake_hub():
    hub = FakeHub({TOKEN: "alice"}).start()
    hub.repos["bob/taken"] = Repo(owner="bob")  # someone else's repo
    yield hub
    hub.stop()


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- the card


def test_card_front_matter_parses_and_has_the_hub_fields(run_dir):
    from huggingface_hub import ModelCard

    card = ModelCard.load(run_dir / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == "tiny"
    assert meta["library_name"] == "diffusers"
    assert meta["license"] == "apache-2.0"
    assert {"amused", "lora", "text-to-image", "styledrop"} <= set(meta["tags"])
    assert meta["instance_prompt"] == PROMPT
    assert [w["output"]["url"] for w in meta["widget"]] == ["samples/step-2.png", "samples/step-0.png"]
    for widget in meta["widget"]:
        assert (run_dir / widget["output"]["url"]).is_file()
        assert PROMPT in widget["text"]


def test_card_body_reports_data_recipe_loss_samples_and_usage(run_dir):
    text = (run_dir / "README.md").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mean = sum(r["loss"] for r in rows) / len(rows)  # the final loss is smoothed: the mean of the last steps
    assert (f"Final loss **{mean:.4f}** (mean of the last 2 steps; the last step's {rows[-1]['loss']:.4f}) "
            "at step **2** of 2") in text
    assert "one image (`img0.png`)" in text
    for row in ("| adapter.rank | `4` |", "| adapter.alpha | `8", "| train.max_steps | `2` |",
                "| model.base | `tiny` |"):
        assert row in text
    assert "![validation grid at step 2](samples/step-2.png)" in text and "![loss curve](loss.png)" in text
    assert f"amused-tune sample --base tiny --adapter {run_dir / 'adapter'} --prompt '{PROMPT}'" in text
    assert "AmusedLoraLoaderMixin.lora_state_dict(" in text and "return_lora_metadata=True" in text
    assert "load_lora_into_transformer(" in text and "PeftModel.from_pretrained(" in text


def test_card_usage_code_runs_with_diffusers_and_peft(run_dir, tmp_path, monkeypatch):
    """The card's two Python snippets, run as written (base: a local tiny pipeline folder), give the kit's logits."""
    import torch

    from amused_tune.model import adapters
    from amused_tune.share.hub import read_recipe, render_card
    from amused_tune.model.bases import build_tiny, encode_prompts, load_components

    base = tmp_path / "tiny-pipeline"
    build_tiny().save_pretrained(base)
    recipe = read_recipe(run_dir)
    recipe["model"]["base"] = str(base)
    snippets = re.findall(r"```python\n(.*?)```", render_card(run_dir, recipe), re.S)
    assert len(snippets) == 2

    torch.manual_seed(0)
    inputs = dict(input_ids=torch.randint(0, 64, (1, 8, 8)), encoder_hidden_states=torch.randn(1, 77, 32),
                  pooled_text_emb=torch.randn(1, 32), micro_conds=torch.tensor([[32.0, 32.0, 0.0, 0.0, 6.0]]))
    kit = load_components(str(base))
    adapters.load_lora(kit.transformer, run_dir)
    adapters.load_lora(kit.text_encoder, run_dir, part="text_encoder")
    with torch.no_grad():
        expected = kit.transformer(**inputs)
        assert (expected - load_components(str(base)).transformer(**inputs)).abs().max() > 1e-3  # the LoRA matters
    expected_text = encode_prompts(kit.text_encoder, kit.tokenizer, [PROMPT])
    monkeypatch.chdir(tmp_path)
    for code in snippets:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own generated example
        pipe = namespace["pipe"]
        with torch.no_grad():
            torch.testing.assert_close(pipe.transformer(**inputs), expected, atol=1e-5, rtol=1e-5)
        for got, want in zip(encode_prompts(pipe.text_encoder, pipe.tokenizer, [PROMPT]), expected_text):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "sample.png").is_file()


def test_card_of_a_dataset_card_run_and_of_a_full_run(run_dir):
    from huggingface_hub import ModelCard

    from amused_tune.share.hub import read_recipe, render_card

    recipe = read_recipe(run_dir)
    recipe["data"] = {"card": "nouns"}  # a Hub dataset, through its card
    recipe["model"]["base"] = "amused/amused-256"
    text = render_card(run_dir, recipe, repo_id="alice/nouns-lora")
    meta = ModelCard(text).data.to_dict()
    assert meta["datasets"] == ["m1guelpf/nouns"] and meta["license"] == "openrail++"
    assert "instance_prompt" not in meta and "styledrop" not in meta["tags"]
    assert "the dataset card `nouns`" in text and "Training data licence: cc0-1.0." in text
    assert 'amused-tune sample --base amused/amused-256 --adapter alice/nouns-lora' in text

    recipe["adapter"]["kind"] = "full"
    text = render_card(run_dir, recipe, repo_id="alice/nouns-full")
    meta = ModelCard(text).data.to_dict()
    assert "lora" not in meta["tags"] and "full-fine-tune" in meta["tags"]
    assert 'UVit2DModel.from_pretrained("alice/nouns-full", subfolder="transformer")' in text
    assert "| adapter.rank |" not in text


def test_card_keeps_hand_edits(run_copy):
    from amused_tune.share.hub import read_recipe, write_card

    card = run_copy / "README.md"
    card.write_text(card.read_text().split("\n", 1)[0] + "\nmy own card\n")  # the marker line is gone
    assert write_card(run_copy, read_recipe(run_copy)) is None
    assert card.read_text().endswith("my own card\n")


# --------------------------------------------------------------------------------------------- push


def test_push_uploads_the_run_in_one_commit_without_checkpoints_or_token(run_copy, fake_hub, tmp_path):
    before = snapshot(run_copy)
    assert any(p.startswith("checkpoints/") and p.endswith("state.pt") for p in before)  # optimizer state exists
    assert any(p.startswith("cache/") for p in before)  # and a data cache

    result = push(run_copy, "--repo-id", "alice/pixel-lora", "--token-from-env", endpoint=fake_hub.endpoint,
                  home=tmp_path / "hf-home")
    assert result.returncode == 0, result.stderr
    assert "pushed 11 files to" in result.stdout

    repo = fake_hub.repos["alice/pixel-lora"]
    assert not repo.private and len(repo.commits) == 1
    assert set(repo.files) == ADAPTER_FILES | {"README.md", "recipe.yaml", "loss.png", "samples/step-0.png",
                                              "samples/step-2.png"}
    for name in ADAPTER_FILES:
        assert repo.files[name] == (run_copy / "adapter" / name).read_bytes()
    assert b"text_encoder.text_model" in repo.files["pytorch_lora_weights.safetensors"][:20000]
    assert not [p for p in repo.files if re.search(r"checkpoint|optim|state|cache|\.pt$|metrics|logs", p)]

    secret = TOKEN.encode()
    assert not [p for p, data in repo.files.items() if secret in data]
    assert not [r["path"] for r in fake_hub.requests if secret in r["body"]]
    assert TOKEN not in result.stdout + result.stderr
    assert not [p for p in run_copy.rglob("*") if p.is_file() and secret in p.read_bytes()]
    writes = [r for r in fake_hub.requests if r["method"] == "POST" and r["path"].startswith("/api/models/")]
    assert writes and all(r["authorization"] == f"Bearer {TOKEN}" for r in writes)

    # the uploaded card points at the repo, parses, and the local card was refreshed to the same text
    from huggingface_hub import ModelCard

    card = repo.files["README.md"].decode()
    assert ModelCard(card).data.to_dict()["instance_prompt"] == PROMPT
    assert '"alice/pixel-lora", weight_name="pytorch_lora_weights.safetensors"' in card
    assert (run_copy / "README.md").read_text() == card
    after = snapshot(run_copy)
    assert {k: v for k, v in after.items() if k != "README.md"} == {k: v for k, v in before.items() if k != "README.md"}


def test_push_private_creates_a_private_repo(run_copy, fake_hub, tmp_path):
    result = push(run_copy, "--repo-id", "alice/secret-lora", "--private", endpoint=fake_hub.endpoint,
                  home=tmp_path / "hf-home")
    assert result.returncode == 0, result.stderr
    create = next(r for r in fake_hub.requests if r["path"] == "/api/repos/create")
    assert create["json"]["visibility"] == "private"
    assert fake_hub.repos["alice/secret-lora"].private


def _closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("case, expected", [
    ("no token", "no Hugging Face token"),
    ("token-from-env unset", "HF_TOKEN environment variable is not set"),
    ("bad token", "rejected the token (401"),
    ("someone else's repo", "no write access to bob/taken (403"),
    ("no network", "cannot reach the Hub at http://127.0.0.1:"),
    ("bad repo id", "must look like user/name"),
    ("offline", "HF_HUB_OFFLINE is set"),
    ("not a run", "has no recipe.yaml"),
])
def test_push_failure_is_one_line_exit_2_and_leaves_the_run_intact(run_copy, fake_hub, tmp_path, case, expected):
    before = snapshot(run_copy)
    args, token, endpoint = ["--repo-id", "alice/pixel-lora"], TOKEN, fake_hub.endpoint
    if case == "no token":
        token = None
    elif case == "token-from-env unset":
        token, args = None, args + ["--token-from-env"]
    elif case == "bad token":
        token = "hf_not_a_valid_token"
    elif case == "someone else's repo":
        args = ["--repo-id", "bob/taken"]
    elif case == "no network":
        endpoint = _closed_port_endpoint()
    elif case == "bad repo id":
        args = ["--repo-id", "not a repo"]
    run, env = run_copy, {"HF_HUB_OFFLINE": "1"} if case == "offline" else {}
    if case == "not a run":
        run = run_copy / "adapter"
    result = push(run, *args, endpoint=endpoint, token=token, home=tmp_path / "hf-home", **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("amused-tune: error: ") and expected in lines[0], result.stderr
    assert TOKEN not in result.stderr + result.stdout
    assert snapshot(run_copy) == before
    assert fake_hub.repos["bob/taken"].files == {} and "alice/pixel-lora" not in {
        k for k, r in fake_hub.repos.items() if r.files}


def test_push_refuses_a_file_that_contains_the_token(run_copy, fake_hub, tmp_path):
    with open(run_copy / "recipe.yaml", "a") as f:
        f.write(f"# {TOKEN}\n")  # e.g. pasted into a comment by mistake
    result = push(run_copy, "--repo-id", "alice/pixel-lora", endpoint=fake_hub.endpoint, home=tmp_path / "hf-home")
    assert result.returncode == 2
    assert "recipe.yaml contain(s) your Hub token" in result.stderr and TOKEN not in result.stderr
    assert not [r for r in fake_hub.requests if r["method"] == "POST"]


def test_push_dry_run_lists_the_files_and_contacts_nothing(run_copy, fake_hub, tmp_path):
    result = push(run_copy, "--repo-id", "alice/x", "--dry-run", endpoint=fake_hub.endpoint, token=None,
                  home=tmp_path / "hf-home")
    assert result.returncode == 0, result.stderr
    assert "samples/step-2.png" in result.stdout and "checkpoints" not in result.stdout
    assert not [r for r in fake_hub.requests if r["path"].startswith("/api/repos") or "/commit/" in r["path"]]


def test_output_push_to_hub_pushes_at_the_end_of_training(tmp_path, fake_hub, monkeypatch):
    """`output.push_to_hub: true`: the run pushes itself; a failed push keeps the run and reports push_error."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    data = make_images(tmp_path / "data", n=1)

    summary = train_run(tmp_path / "ok", data, push_to_hub=True, hub_repo_id="alice/auto", hub_private=True)
    assert summary["pushed"].endswith("/alice/auto") and "push_error" not in summary
    repo = fake_hub.repos["alice/auto"]
    assert repo.private and ADAPTER_FILES <= set(repo.files) and "README.md" in repo.files
    assert '"alice/auto"' in (tmp_path / "ok" / "README.md").read_text()
    assert TOKEN not in (tmp_path / "ok" / "recipe.yaml").read_text()

    reset_accelerate()
    summary = train_run(tmp_path / "denied", data, push_to_hub=True, hub_repo_id="bob/taken")
    assert "no write access to bob/taken" in summary["push_error"]
    assert "amused-tune push" in summary["push_error"]
    assert (tmp_path / "denied" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert fake_hub.repos["bob/taken"].files == {}
    for path in (tmp_path / "ok").rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".jsonl", ".md", ".json", ".log", ".txt"):
            assert TOKEN not in path.read_text(errors="replace"), path
