"""The web page's screenshots in docs/ (docs/ui-runs.png, ui-new-run.png, ui-compare.png, ui-share.png).

    python bench/ui_screenshots.py             # trains the quickstart (CPU, about a minute), then drives the page

Trains the quickstart into a temporary runs folder with the command line, measures it with the toy eval (its table
shows on the Runs tab; --no-eval skips it), starts `amused-tune ui` on a free loopback port and photographs each
tab at 1280 px wide in the system's headless chromium (playwright), the whole page height.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ui_startup import ENV, ROOT, start_page  # noqa: E402

PROMPT = "a white square on a red background in [v] style"


def train(runs: Path, evaluate: bool) -> Path:
    out = runs / "quickstart-lora"
    subprocess.run([sys.executable, "-m", "amused_tune.cli", "recipes/quickstart.yaml", f"--output.dir={out}"],
                   cwd=ROOT, env=ENV, check=True, stdout=subprocess.DEVNULL)
    if evaluate:
        subprocess.run([sys.executable, "-m", "amused_tune.toy", "eval", "--adapter", str(out)], cwd=ROOT, env=ENV,
                       check=True, stdout=subprocess.DEVNULL)
    return out


def wait_text(page, selector: str, text: str, timeout: float = 300) -> None:
    page.wait_for_function(f"document.querySelector({selector!r})?.innerText.includes({text!r})",
                           timeout=timeout * 1000)


def shoot(url: str, out: Path, docs: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        wait_text(page, "#run-status", "finished")
        page.wait_for_selector("#grid-image img")
        time.sleep(2)
        page.screenshot(path=docs / "ui-runs.png", full_page=True)

        page.get_by_role("tab", name="New run").click()
        page.locator("#recipe input").fill("styledrop_256")
        page.locator("#recipe input").press("Enter")
        page.locator("#check-run").click()
        wait_text(page, "#estimate", "predicted peak", timeout=600)
        page.wait_for_selector("#data-images img")
        time.sleep(1)
        page.screenshot(path=docs / "ui-new-run.png", full_page=True)

        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-paths textarea").fill(f"runs/{out.name}")
        page.locator("#compare-prompt textarea").fill(PROMPT)
        page.locator("#compare-generate").click()
        page.wait_for_function("document.querySelectorAll('#compare-gallery img').length >= 2", timeout=300_000)
        time.sleep(2)
        page.screenshot(path=docs / "ui-compare.png", full_page=True)

        page.get_by_role("tab", name="Share").click()
        page.locator("#push-repo textarea, #push-repo input").first.fill("you/quickstart-style")
        page.locator("#push").click()
        wait_text(page, "#share-message", "would upload")
        time.sleep(1)
        page.screenshot(path=docs / "ui-share.png", full_page=True)
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-eval", action="store_true", help="skip the toy eval (its table on the Runs tab)")
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        out = train(runs, not args.no_eval)
        proc, url, _ = start_page(Path("runs"), cwd=Path(tmp))  # the page shows paths as a user's would look
        try:
            shoot(url, out, Path(args.docs))
        finally:
            proc.terminate()
            proc.wait()
    print("wrote", ", ".join(str(Path(args.docs) / f"ui-{n}.png") for n in ("runs", "new-run", "compare", "share")))
    return 0


if __name__ == "__main__":
    os.environ.update(ENV)
    raise SystemExit(main())
