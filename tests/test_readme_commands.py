"""Every offline command of README.md runs as written, in order, from a fresh folder.

Which commands: each line of a ```bash block that starts with `amused-tune ` or `python -m amused_tune` (a line
ending in `\\` goes on with the next), in the README's order, so that a command may use what an earlier one wrote
(`runs/quickstart-lora`, `merged/`). Other lines (`pip install`, `hf download`, `pytest`) are not the kit's commands.

Which are left out: only a command whose own comment says what it needs that a CPU test machine without network
lacks, with the mark `needs: network`, `needs: gpu`, `needs: minutes` (a full evaluation or a full-length run that
takes minutes on a CPU) or `needs: browser` (a web page served until someone stops it), e.g.::

    amused-tune push runs/quickstart-lora --repo-id you/toy-frame-style   # one commit; needs: network

Whoever adds a command to the README either lets it run here or marks it so; the test fails on a mark it does not
know and when more than MAX_LEFT_OUT commands are marked (a README that cannot be tried is no README).

Where: a temporary folder holding what a fresh checkout has besides the package (recipes/, datasets_cards/, assets/,
README.md); the package is the installed one (`amused-tune` and `python -m` resolve as for a user). Environment:
HF_HUB_OFFLINE=1 (nothing reaches the network), one CPU thread per command.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KIT = ("recipes", "datasets_cards", "assets")
KNOWN_NEEDS = {"network", "gpu", "minutes", "browser"}
MAX_LEFT_OUT = 10
NEEDS = re.compile(r"#.*\bneeds:\s*([^\s;,)]+)")  # any word after it: an unknown one fails the test


def readme_commands(text: str) -> list[tuple[str, str | None]]:
    """(command, what it needs or None) for every kit command in the bash blocks of `text`, in order."""
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            command = lines[i]
            while command.rstrip().endswith("\\") and i + 1 < len(lines):  # a continued line
                i += 1
                command = command.rstrip()[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            command = command.strip()
            if command.startswith(("amused-tune ", "python -m amused_tune")):
                need = NEEDS.search(command)
                found.append((command, need.group(1) if need else None))
    return found


def test_the_readme_commands_are_found_with_their_marks():
    text = "```bash\namused-tune a.yaml   # first\npython -m amused_tune.toy eval \\\n    --adapter x  # x\n" \
           "pip install x\namused-tune push y   # one commit; needs: network\n```\n"
    assert readme_commands(text) == [("amused-tune a.yaml   # first", None),
                                     ("python -m amused_tune.toy eval --adapter x  # x", None),
                                     ("amused-tune push y   # one commit; needs: network", "network")]


@pytest.fixture
def fresh_folder(tmp_path) -> Path:
    folder = tmp_path / "checkout"
    folder.mkdir()
    for name in KIT:
        shutil.copytree(REPO / name, folder / name)
    shutil.copy(REPO / "README.md", folder / "README.md")
    return folder


@pytest.mark.slow  # about 2-3 minutes on 2 busy cores: the quickstart trains, the rest are seconds each
def test_every_offline_readme_command_runs_as_written_in_order(fresh_folder):
    commands = readme_commands((REPO / "README.md").read_text())
    left_out = [(c, need) for c, need in commands if need]
    assert {need for _, need in left_out} <= KNOWN_NEEDS, left_out
    assert len(left_out) <= MAX_LEFT_OUT, left_out
    to_run = [c for c, need in commands if not need]
    assert any(c.startswith("amused-tune recipes/quickstart.yaml") for c in to_run)  # the others use its run
    assert any(c.startswith("amused-tune sample --adapter runs/quickstart-lora") for c in to_run)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    took = []
    for command in to_run:
        started = time.monotonic()
        done = subprocess.run(["bash", "-c", command], cwd=fresh_folder, env=env, capture_output=True, text=True,
                              timeout=600)
        took.append((round(time.monotonic() - started, 1), command[:60]))
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{(done.stdout + done.stderr)[-3000:]}"
        assert "Traceback" not in done.stderr, f"{command}\n{done.stderr[-3000:]}"
    print("\n".join(f"{s:6.1f} s  {c}" for s, c in took))
    # what the commands promise, checked on what they wrote
    assert (fresh_folder / "runs" / "quickstart-lora" / "adapter" / "amused_tune.json").is_file()
    assert (fresh_folder / "runs" / "quickstart-lora" / "samples" / "before_after.png").is_file()  # the picture shown
    if any(c.startswith("amused-tune merge runs/quickstart-lora --out merged/") for c in to_run):
        assert (fresh_folder / "merged" / "sampling.json").is_file()


def test_ci_runs_the_readmes_full_test_command_and_no_pytest_call_that_selects_nothing():
    """.ci/run calls the README's full test command, and every pytest call in it passes --full: without it a call
    naming only slow-marked tests (the wheel's, from a virtualenv) deselects them all and exits 5, failing CI."""
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^pytest --full\b", readme, re.M)
    calls = [line.split("#")[0] for line in (REPO / ".ci" / "run").read_text().splitlines()
             if re.search(r"\bpytest\b", line.split("#")[0])]
    assert any(c.strip() == "pytest --full" for c in calls), calls
    assert calls and all("--full" in c for c in calls), calls
