"""Training runs the page starts: each is the command line `amused-tune RECIPE ...` in a process of its own
(its own session, so closing the page or stopping the page's server does not stop it), its output in a log file
(the run also keeps its own, OUTPUT_DIR/train.log, which the Runs tab shows for any run),
its pid in `RUNS/.ui/NAME.json` so that a restarted page still finds it. Stop sends SIGINT: the trainer finishes
the step, writes a checkpoint and exits (train/stops.py); rerunning the same command resumes from it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

UI_DIR = ".ui"  # under the runs folder: the page's own files (process records, logs, compare images)


def command_for(argv: list[str]) -> tuple[list[str], str]:
    """(what to execute, the command line as a user would type it) for `amused-tune ARGV`."""
    # the page's own interpreter runs the kit it imports (an `amused-tune` on PATH may belong to another install);
    # `python -m amused_tune.cli` is the console script's entry point
    return [sys.executable, "-m", "amused_tune.cli", *argv], shlex.join(["amused-tune", *argv])


def _record(runs: Path, out: Path) -> Path:
    return Path(runs) / UI_DIR / f"{Path(out).resolve().name}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a finished child of this server that nobody waited for is a zombie: not alive
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:  # not our child (started by an earlier page): kill(0) said it exists
        stat = Path(f"/proc/{pid}/stat")
        return not (stat.is_file() and stat.read_text().split(") ")[-1].startswith("Z"))


def start(runs: Path, out: Path, argv: list[str], env: dict | None = None) -> dict:
    """Start `amused-tune ARGV` training into `out`; returns its record (pid, command, log, out)."""
    running = record_of(runs, out)
    if running and running["alive"]:
        raise RuntimeError(f"{out} is already training (pid {running['pid']}): stop it first")
    exe, shown = command_for(argv)
    log_path = Path(runs) / UI_DIR / f"{Path(out).resolve().name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shown}\n".encode())
        log.flush()
        proc = subprocess.Popen(exe, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    record = {"pid": proc.pid, "command": shown, "log": str(log_path), "out": str(Path(out).resolve()),
              "started": time.time()}
    _record(runs, out).write_text(json.dumps(record))
    return {**record, "alive": True}


def record_of(runs: Path, out: Path) -> dict | None:
    """The page's record of the process training `out` (with "alive"), or None when the page started none."""
    path = _record(runs, out)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {**record, "alive": _alive(int(record["pid"]))}


def alive_runs(runs: Path) -> dict[str, bool]:
    """Run folder (resolved) -> whether the process the page started for it is alive."""
    found = {}
    for path in (Path(runs) / UI_DIR).glob("*.json"):
        try:
            record = json.loads(path.read_text())
            found[record["out"]] = _alive(int(record["pid"]))
        except (OSError, ValueError, KeyError):
            continue
    return found


def stop(runs: Path, out: Path) -> str:
    """Send SIGINT to the training process of `out` (it writes a checkpoint, then exits); one line for the page."""
    record = record_of(runs, out)
    if not record:
        return f"{Path(out).name}: the page did not start this run, so it cannot stop it (press Ctrl-C where it runs)"
    if not record["alive"]:
        return f"{Path(out).name} is not running"
    os.kill(int(record["pid"]), signal.SIGINT)
    return (f"stopping {Path(out).name}: it finishes this step, writes a checkpoint and exits; "
            "Start with the same settings resumes it")


def early_failure(runs: Path, out: Path, wait_s: float = 5.0) -> str | None:
    """The command's error line when the run ended within `wait_s` (a mistake found before training), else None."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        record = record_of(runs, out)
        if record is None or record["alive"]:
            time.sleep(0.2)
            continue
        said = [line for line in _tail(Path(record["log"]), 20).splitlines() if "error:" in line]
        return said[-1] if said else f"the run ended at once: see {record['log']}"
    return None


def log_file(runs: Path, out: Path) -> Path | None:
    """The log to show for the run in `out`: its own `train.log` (written by the run, however it was started), or
    the output of the process this page started when that is newer (a mistake found before the run's folder was
    ready is only there), or None."""
    from amused_tune.train.runlog import RUN_LOG

    own = Path(out) / RUN_LOG
    record = record_of(runs, out)
    page = Path(record["log"]) if record else None
    found = [p for p in (own, page) if p is not None and p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime, p == own)) if found else None


def log_tail(runs: Path, out: Path, lines: int = 40) -> str:
    """The last lines of the run's log (progress bars' carriage returns folded to their last state)."""
    path = log_file(runs, out)
    return _tail(path, lines) if path else ""


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:  # a long run's log is not read whole
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.split("\r")[-1] for line in text.split("\n")]  # (splitlines would split at each \r too)
    return "\n".join([line for line in kept if line.strip()][-lines:])
