"""The dashboard of the demo's run: how long building it takes, its size on disk (per live latent, and
extrapolated to 16k and 65k live latents), and how long its pages take to open from disk in headless
Chromium (the index, and a latent page: the page and its data shard loaded and drawn).

Uses the run `make demo` trains (outputs/runs/organism-relu) and the organism beside it.

Run: .venv/bin/python bench/bench_dashboard.py
"""

import shutil
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from crosscoder_utils.analysis import analyse
from crosscoder_utils.dashboard import build_dashboard


def main(run_dir=Path("outputs/runs/organism-relu")):
    start = time.perf_counter()
    site = build_dashboard(analyse(run_dir), out_dir=Path("outputs/bench_dashboard")).resolve()
    built = time.perf_counter() - start
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    n_live = (site / "data/index.js").read_text().count('"latent":')
    print(f"built in {built:.1f} s: {n_live} live latents, {size / 1e6:.1f} MB ({size / n_live / 1e3:.1f} kB a latent)")
    for n in (16_384, 65_536):
        print(f"  at {n:,} live latents: about {size / n_live * n / 1e6:,.0f} MB")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        for name, url, ready in (
            ("index", (site / "index.html").as_uri(), "#latents tbody tr"),
            ("latent page", (site / "latent.html").as_uri() + f"#{_first(site)}", "#top .token"),
        ):
            timings = []
            for _ in range(5):
                start = time.perf_counter()
                page.goto("about:blank")
                page.goto(url)
                page.wait_for_selector(ready)
                timings.append(time.perf_counter() - start)
            print(f"  {name} opens and draws in {min(timings) * 1000:.0f}-{max(timings) * 1000:.0f} ms (5 loads)")
        browser.close()


def _first(site: Path) -> int:
    return int((site / "data/index.js").read_text().split('"latent":', 2)[1].split(",")[0])


if __name__ == "__main__":
    main()
