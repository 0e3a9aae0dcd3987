"""How fast the web page starts, and how fast its Runs tab lists 100 runs (the numbers in docs/ui.md).

    python bench/ui_startup.py                 # 3 starts, then 100 fake runs listed in-process and in the browser
    python bench/ui_startup.py --repeats 5 --no-browser

Start: from launching `amused-tune ui` (a fresh Python process) to the first HTTP 200 on 127.0.0.1, and the CPU time
the process used by then (what the start costs when the machine is not busy with other work). The page loads
no model when it starts (Compare loads the base when asked), so the toy base costs nothing here.
Listing: the Runs tab's own listing (`Page.table`, what every poll runs) over 100 run folders, each with a
recipe.yaml and a 200-row metrics.jsonl: the first call in a fresh process and the median of the next ones; with
playwright and the system's chromium, also the time from opening the page to its runs table showing the newest run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_runs(root: Path, n: int = 100, rows: int = 200) -> None:
    for k in range(n):
        out = root / f"run-{k:03d}"
        out.mkdir(parents=True)
        (out / "recipe.yaml").write_text(f"model:\n  base: toy\ntrain:\n  max_steps: {rows}\n")
        (out / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3, "images_per_s": 9.0, "peak_mem_gb": 0.6}) + "\n"
            for s in range(1, rows + 1)))
        stamp = time.time() - 1000 + k
        os.utime(out / "metrics.jsonl", (stamp, stamp))
        os.utime(out / "recipe.yaml", (stamp, stamp))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_page(runs: Path, cwd: Path = ROOT) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "amused_tune.cli", "ui", "--runs", str(runs), "--port", str(port)],
                            env=ENV, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            proc.cpu_s = cpu_seconds(proc.pid)
            return proc, url, time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                log.seek(0)
                raise SystemExit("the page did not start:\n" + log.read().decode(errors="replace")[-2000:])
            time.sleep(0.05)


def listing_times(runs: Path, repeats: int) -> tuple[float, float]:
    """(first call, median of the next calls) of the Runs tab's listing, in a fresh process."""
    code = ("import sys, time, json; sys.path.insert(0, %r)\n"
            "from amused_tune.ui.app import Page; t = time.perf_counter(); p = Page(%r); rows, _ = p.table()\n"
            "first = time.perf_counter() - t; assert len(rows) == 100, len(rows)\n"
            "times = []\n"
            "for _ in range(%d):\n"
            "    t = time.perf_counter(); p.table(); times.append(time.perf_counter() - t)\n"
            "print(json.dumps([first, sorted(times)[len(times) // 2]]))") % (str(ROOT), str(runs), repeats)
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def browser_time(url: str) -> float | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_function("document.querySelector('#runs-table')?.innerText.includes('run-099')",
                               timeout=60_000)
        seconds = time.perf_counter() - t0
        browser.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty, full = Path(tmp) / "empty", Path(tmp) / "runs"
        starts, cpu = [], []
        for _ in range(args.repeats):
            proc, _, seconds = start_page(empty)
            starts.append(seconds)
            cpu.append(proc.cpu_s)
            proc.terminate()
            proc.wait()
        fake_runs(full)
        first, warm = listing_times(full, max(args.repeats, 5))
        shown = None
        if not args.no_browser:
            proc, url, _ = start_page(full)
            try:
                shown = browser_time(url)
            finally:
                proc.terminate()
                proc.wait()
    print(f"start to first HTTP 200: median {statistics.median(starts):.2f} s of {args.repeats} "
          f"({', '.join(f'{s:.2f}' for s in starts)}); CPU time used by then: median {statistics.median(cpu):.2f} s")
    print(f"100 runs listed (Page.table): first call in a fresh process {first:.3f} s, then {warm * 1000:.1f} ms")
    if shown is not None:
        print(f"100 runs: page opened to the newest run shown in the table: {shown:.2f} s (headless chromium)")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
