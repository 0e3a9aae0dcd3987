"""Compare and Share: the page builds the command line a user would type and runs that command's own `main`
(`amused-tune sample`, `merge`, `push`) in the page's process, so its images, files and one-line errors are the
command's own. What the command printed comes back to the page; an error is its one line, never a traceback."""

from __future__ import annotations

import contextlib
import io
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from amused_tune.ui.processes import UI_DIR

_LOCK = threading.Lock()  # the commands print to sys.stdout/stderr, which are swapped while one runs
MAX_ADAPTERS = 3


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The command's error line (`amused-tune X: error: ...`), else its last stderr line."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        said = [line for line in lines if "error:" in line]
        return (said or lines or [f"exit code {self.code}"])[-1]


def run_command(name: str, argv: list[str]) -> Result:
    """`amused-tune NAME ARGV` through the command's own main, its output captured."""
    import importlib

    from amused_tune.cli.args import SUBCOMMANDS

    module = importlib.import_module(SUBCOMMANDS[name])
    out, err = io.StringIO(), io.StringIO()
    with _LOCK, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main(list(argv))
        except Exception as exc:  # noqa: BLE001 - the page shows one line, whatever the command raised
            print(f"amused-tune {name}: error: {type(exc).__name__}: {exc}".splitlines()[0], file=err)
            code = 1
    return Result(int(code or 0), out.getvalue(), err.getvalue())


@dataclass
class Settings:
    """What Compare samples with: one prompt and seed for every column."""

    base: str
    prompt: str
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    adapter_scale: float = 1.0
    styledrop: tuple[float, float] | None = None  # StyleDrop guidance (lambda_a, lambda_b); adapters only


def sample_argv(settings: Settings, adapter: str | None, out: Path) -> list[str]:
    """The `amused-tune sample` arguments for one column (the base alone when `adapter` is None)."""
    s = settings
    argv = ["--base", s.base.strip()]
    if s.prompt.strip():  # an empty prompt is left out: the command then says --prompt is required
        argv += ["--prompt", s.prompt]
    argv += ["--seed", str(int(s.seed)), "--out", str(out)]
    if s.steps:
        argv += ["--steps", str(int(s.steps))]
    if adapter:
        argv += ["--adapter", adapter, "--adapter-scale", f"{s.adapter_scale:g}"]
        if s.styledrop:
            argv += ["--styledrop-guidance", f"{s.styledrop[0]:g}", f"{s.styledrop[1]:g}"]
    if s.guidance is not None and not (adapter and s.styledrop):
        argv += ["--guidance", f"{s.guidance:g}"]
    return argv


@dataclass
class Column:
    label: str
    command: str
    image: Path | None = None
    error: str | None = None


def compare(runs: Path, settings: Settings, adapters: list[str]) -> list[Column]:
    """The base, then each adapter (up to three), sampled with the same prompt and seed; each image is the file
    `amused-tune sample` writes, with the settings in its PNG text chunks."""
    folder = Path(runs) / UI_DIR / "compare" / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while folder.with_name(f"{folder.name}-{n}").exists():
        n += 1
    folder = folder.with_name(f"{folder.name}-{n}")
    columns = []
    for k, adapter in enumerate([None, *[a for a in adapters if a.strip()][:MAX_ADAPTERS]]):
        out = folder / (f"{k}-base" if adapter is None else f"{k}-{Path(adapter).name or 'adapter'}")
        argv = sample_argv(settings, adapter, out)
        column = Column("base " + settings.base if adapter is None else f"{Path(adapter).name} on {settings.base}",
                        shlex.join(["amused-tune", "sample", *argv]))
        result = run_command("sample", argv)
        if result.code:
            column.error = result.error
        else:
            column.image = out / f"000-seed{int(settings.seed)}.png"
        columns.append(column)
        if adapter is None and column.error:  # the base itself fails (no such base, empty prompt): say it once
            break
    return columns


def merge(run: str, out: str, scale: float = 1.0, overwrite: bool = False) -> str:
    argv = [run, "--out", out, "--scale", f"{scale:g}"] + (["--overwrite"] if overwrite else [])
    result = run_command("merge", argv)
    return result.error if result.code else result.out.strip().splitlines()[-1]


def push(run: str, repo_id: str, private: bool = False, dry_run: bool = False) -> str:
    """`amused-tune push`: the token is the usual login's (HF_TOKEN or `hf auth login`), never seen by the page."""
    argv = [run, "--repo-id", repo_id.strip()] + (["--private"] if private else []) + (["--dry-run"] if dry_run else [])
    result = run_command("push", argv)
    return result.error if result.code else result.out.strip()
