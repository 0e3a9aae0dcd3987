"""Helpers shared by the test modules (the fixtures every test gets stay in conftest.py): a test module imports
them from here, never from another test module.

- data: `pixel_dataset`
- runs: `recipe_for` (the tiny recipe every resume test trains), `final_weights`, `losses`, `assert_same_run`,
  `resumed_equals_straight`
- commands: `no_model_loading` (a fixture: import it into a test module to use it)
- the toy base: `toy_components` (loaded once per session), `fresh_toy` (a private copy to train)
- the Hub: `FakeHub` and `Repo` (a local stand-in for the Hugging Face Hub), `TOKEN`, `push` (the push command in a
  process of its own, pointed at a fake Hub)
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from amused_tune.recipe import (AdapterConfig, DataConfig, ModelConfig, OptimConfig, OutputConfig, Recipe,
                                TrainConfig)
from amused_tune.train import checkpoints, outputs
from conftest import reset_accelerate

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- data


def pixel_dataset(data, resolution: int):
    """The pixel dataset of a data section (its card resolved), every sample validated first (cache off)."""
    from amused_tune.data.cards import resolve_config
    from amused_tune.data.datasets import validated_dataset

    return validated_dataset(resolve_config(data), resolution)[0]


# --------------------------------------------------------------------------------------------- runs


def recipe_for(out: Path, data: Path, kind: str = "lora", adam_8bit: bool = False, max_steps: int = 4,
               **train_overrides) -> Recipe:
    """Two images per micro-batch, two micro-batches per step, condition dropout and random flips: every RNG and
    the data position matter."""
    train_cfg = dict(batch_size=2, grad_accum=2, max_steps=max_steps, precision="fp32", checkpoint_every=2,
                     keep_checkpoints=3, cond_dropout=0.5)
    train_cfg.update(train_overrides)
    return Recipe(
        model=ModelConfig(base="tiny"),
        data=DataConfig(source="imagefolder", path=str(data), cache=False, random_flip=True),
        adapter=AdapterConfig(kind=kind, rank=4, alpha=8.0),
        optim=OptimConfig(lr=2e-3, adam_8bit=adam_8bit),
        train=TrainConfig(**train_cfg),
        output=OutputConfig(dir=str(out), loss_plot=False),
    )


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of the newest checkpoint (every trainable parameter by name)."""
    return load_file(checkpoints.list_checkpoints(out / "checkpoints")[-1] / "trainable.safetensors")


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in outputs.read_metrics(out / "metrics.jsonl")]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert losses(a) == losses(b)


def resumed_equals_straight(tmp_path, recipe) -> None:
    """`recipe(out, max_steps)` run 4 steps straight, and 2 steps then resumed to 4: the same weights and losses."""
    from amused_tune.train.loop import train

    train(recipe(tmp_path / "straight", 4))
    reset_accelerate()
    train(recipe(tmp_path / "resumed", 2))
    reset_accelerate()
    train(recipe(tmp_path / "resumed", 4))
    reset_accelerate()
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


# --------------------------------------------------------------------------------------------- commands


@pytest.fixture
def no_model_loading(monkeypatch):
    """Every check below happens before a base model is loaded (wherever the kit imported the loader)."""
    import amused_tune.train.loop  # noqa: F401 (loaded now, so that its copy of the name is replaced too)

    def refuse(*args, **kwargs):
        raise AssertionError("a base model was loaded before the inputs were checked")

    for name, module in list(sys.modules.items()):
        if name.startswith("amused_tune") and hasattr(module, "load_components"):
            monkeypatch.setattr(module, "load_components", refuse)


# --------------------------------------------------------------------------------------------- the toy base


@lru_cache(maxsize=1)
def toy_components():
    """The shipped toy base (read-only by convention: do not train it, use `fresh_toy()`)."""
    from amused_tune.model.bases import load_components

    return load_components("toy")


def fresh_toy():
    """A private deep copy of the toy base, safe to fine-tune."""
    return copy.deepcopy(toy_components())


# --------------------------------------------------------------------------------------------- the Hub

TOKEN = "hf_fakeAliceToken0123456789abcdef"


def push(run: Path, *args: str, endpoint: str, token: str | None = TOKEN, home: Path,
         **extra_env: str) -> subprocess.CompletedProcess:
    """`amused-tune push RUN ARGS` in a process of its own, against the Hub at `endpoint` with `token`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONPATH=str(REPO))
    if token is not None:
        env["HF_TOKEN"] = token
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "amused_tune.cli", "push", str(run), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# A local, in-memory stand-in for the Hugging Face Hub: the few routes `HfApi.create_repo` and `create_commit` use.
#
# Bound to 127.0.0.1 on a free port, served by one daemon thread, shut down by `stop()` (the `fake_hub` fixture does
# it at the end of the test). Checked against huggingface_hub 2.4:
#
#   POST /api/repos/create                       {name, organization, visibility?}  -> {url} | 401 | 403 | 409
#   GET  /api/models/{ns}/{name}[/revision/...]  repo info (create_repo(exist_ok=True) asks after a 403)
#   POST /api/validate-yaml                      README.md front matter check       -> {errors, warnings}
#   POST /api/models/{ns}/{name}/preupload/{rev} -> every file "regular" (so contents arrive base64 in the commit)
#   POST /api/models/{ns}/{name}/commit/{rev}    NDJSON: header + one {"key": "file"} line per file -> {commitUrl, ...}
#
# Everything received is kept in `requests` (method, path, auth header, parsed body) for the test to inspect.
# LFS is refused: a client that tried it would show up as a 400 and a failed test, never as a silent pass.


@dataclass
class Repo:
    owner: str
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)


class FakeHub:
    """`tokens` maps a token to its user name; `repos` may be pre-filled (e.g. a repo owned by someone else)."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # ----------------------------------------------------------------------------------------- routes

    def _user(self, headers) -> str | None:
        auth = headers.get("Authorization", "")
        return self.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict, dict]:
        user = self._user(headers)
        path = path.split("?", 1)[0]
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(match[1]) if match else {}
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": f"invalid YAML: {err}"}]}, {}
            if not isinstance(meta, dict):
                return 400, {"errors": [{"message": "front matter is not a mapping"}]}, {}
            return 200, {"errors": [], "warnings": []}, {}
        if method == "POST" and path == "/api/repos/create":
            if user is None:
                return 401, {"error": "Invalid username or password."}, {}
            payload = json.loads(body)
            owner = payload.get("organization") or user
            repo_id = f"{owner}/{payload['name']}"
            if owner != user:
                return 403, {"error": f"You don't have the rights to create a model under the namespace {owner}"}, {}
            with self.lock:
                if repo_id in self.repos:
                    return 409, {"error": "You already created this model repo", "url": self._url(repo_id)}, {}
                self.repos[repo_id] = Repo(owner=user, private=payload.get("visibility") == "private")
            return 200, {"url": self._url(repo_id), "name": repo_id}, {}

        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(preupload|commit|revision)/(.+))?", path)
        if not match:
            return 404, {"error": f"no route {method} {path}"}, {}
        repo_id, action = match[1], match[2]
        repo = self.repos.get(repo_id)
        not_found = (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if repo is None or (repo.private and repo.owner != user):
            return not_found
        if method == "GET" and action in (None, "revision"):
            return 200, {"id": repo_id, "modelId": repo_id, "private": repo.private, "sha": self._head(repo),
                         "siblings": [{"rfilename": name} for name in sorted(repo.files)]}, {}
        if user is None:
            return 401, {"error": "Invalid credentials"}, {}
        if repo.owner != user:
            return 403, {"error": f"You don't have write access to {repo_id}"}, {}
        if method == "POST" and action == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]}, {}
        if method == "POST" and action == "commit":
            return self._commit(repo_id, repo, body)
        return 404, {"error": f"no route {method} {path}"}, {}

    def _commit(self, repo_id: str, repo: Repo, body: bytes) -> tuple[int, dict, dict]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None:
            return 400, {"error": "commit without header"}, {}
        files: dict[str, bytes] = {}
        for line in lines:
            if line["key"] == "file":
                value = line["value"]
                if value.get("encoding") != "base64":
                    return 400, {"error": f"unsupported encoding for {value['path']}"}, {}
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] != "header":
                return 400, {"error": f"this fake Hub accepts regular files only, got {line['key']}"}, {}
        with self.lock:
            oid = hashlib.sha1(json.dumps([self._head(repo), header, sorted(files)]).encode()).hexdigest()
            repo.files.update(files)
            repo.commits.append({"oid": oid, "summary": header.get("summary"), "files": sorted(files)})
        return 200, {"commitUrl": f"{self._url(repo_id)}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}, {}

    def _url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    @staticmethod
    def _head(repo: Repo) -> str:
        return repo.commits[-1]["oid"] if repo.commits else "0" * 40

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    parsed = json.loads(body) if body and "ndjson" not in self.headers.get("Content-Type", "") else None
                except ValueError:
                    parsed = None
                with hub.lock:
                    hub.requests.append({"method": method, "path": self.path, "authorization":
                                         self.headers.get("Authorization"), "json": parsed, "body": body})
                status, payload, extra = hub.handle(method, self.path, self.headers, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def log_message(self, *args):  # quiet
                pass

        return Handler


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "green", "square", "circle", "a", "picture", "of"]


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> str:
    """A BLIP captioner of a few thousand weights, saved like a Hub model; it says "red ..." (biased output)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    vocab = {w: i for i, w in enumerate(WORDS)}
    text = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                bos_token_id=2, sep_token_id=3, eos_token_id=3, pad_token_id=0, max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[vocab["red"]] = 20.0
    folder = tmp_path_factory.mktemp("blip")
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=BertTokenizer(vocab=vocab)).save_pretrained(folder)
    return str(folder)


def one_error(capsys, rc: int, prefix: str = "amused-tune") -> str:
    """The single `prefix: error:` line of a failed command (exit 2), with no traceback."""
    captured = capsys.readouterr()
    err = captured.err
    lines = [line for line in err.splitlines() if line.startswith(f"{prefix}: error: ")]
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1 and "Traceback" not in err + captured.out, err[-2000:]
    return lines[0]


def tiny(tmp_path: Path, folder: Path, name: str = "run", **sections) -> Recipe:
    """A 3-step fp32 LoRA recipe on the tiny base over `folder`; `sections` override keys, e.g. train={"max_steps": 5}."""
    recipe = Recipe(
        model=ModelConfig(base="tiny"),
        data=DataConfig(source="imagefolder", path=str(folder), cache=False, cache_dir=str(tmp_path / "cache")),
        adapter=AdapterConfig(kind="lora", rank=4, alpha=4.0),
        optim=OptimConfig(lr=1e-3),
        train=TrainConfig(batch_size=2, max_steps=3, precision="fp32", checkpoint_every=100, cond_dropout=0.0),
        output=OutputConfig(dir=str(tmp_path / name), loss_plot=False),
    )
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(recipe, section), key, value)
    return recipe
