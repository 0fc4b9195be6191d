"""Peak memory of 04 and 06 against the store's size: the same analysis settings (``max_tokens``,
``explain_tokens``) on a store and on one 4× larger. Their memory is bounded by those settings, never by the
store, when the ratio is near 1.

The organism (outputs/organism, built by `make demo`, or here) is collected into two stores of N and 4N
tokens whose val splits both hold at least ``max_tokens`` rows; a crosscoder is trained on each (the same
settings); then, each in a fresh process, 04's analysis (``analyse`` and the dashboard) and 06's comparison
(``methods.compare``: the diff-SAE trained on Δx read from the store, PCA, ADL, the token maps). Printed for
each, with the ratio of the large store's to the small one's: the peak anonymous memory (what the code
allocates) and the peak resident set, which also counts the pages of the memory-mapped store the process
touched (page cache the kernel can reclaim: the 06 diff-SAE's random batches touch more of a larger store).

Run: .venv/bin/python bench/bench_memory.py [--tokens 100000] [--max-tokens 4000] [--explain-tokens 20000]
"""

import argparse
import subprocess
import sys
from pathlib import Path

from crosscoder_utils import (
    CollectConfig,
    CrossCoderConfig,
    OrganismConfig,
    TrainConfig,
    collect_activations,
    estimate_norm_factors,
    train_crosscoder,
)
from crosscoder_utils.organism import build_organism

STAGE = """
import sys, threading, time

def status(key):  # MiB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024

peak_anon = 0.0
def watch():  # the kernel keeps the peak of the whole resident set (VmHWM), not of its anonymous part
    global peak_anon
    while True:
        peak_anon = max(peak_anon, status("RssAnon"))
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()

from crosscoder_utils import analysis as A, methods
from crosscoder_utils.config import AnalysisConfig
from crosscoder_utils.dashboard import build_dashboard
run, out, stage, max_tokens, explain_tokens = *sys.argv[1:4], *map(int, sys.argv[4:6])
analysis = A.analyse(run, AnalysisConfig(max_tokens=max_tokens, explain_tokens=explain_tokens), device="cpu")
if stage == "04":
    build_dashboard(analysis, out_dir=out + "/dashboard")
else:
    methods.compare(analysis, out + "/compare", n_seeds=1)  # memory at one seed: the store, not the seeds
time.sleep(0.1)
print(peak_anon, status("VmHWM"))
"""


def main(tokens: int, max_tokens: int, explain_tokens: int, out: Path) -> None:
    organism = build_organism(OrganismConfig(out_dir="outputs/organism"))
    runs = {}
    for scale in (1, 4):
        n = tokens * scale
        cfg = CollectConfig(
            base_model=organism.base,
            finetuned_model=organism.finetuned,
            dataset=organism.corpus,
            n_tokens=n,
            val_fraction=max_tokens / tokens,  # both val splits hold at least max_tokens rows
        )
        store = collect_activations(cfg, out / f"store_{scale}x")
        estimate_norm_factors(store, 10, 4096)
        train = TrainConfig(tokens_per_step=1024, train_tokens=200_000, log_to="none", log_every=50)
        runs[scale] = out / f"run_{scale}x"
        train_crosscoder(train, store, runs[scale], CrossCoderConfig(dict_size=192, l1_coeff=0.5, tanh_scale=0.015))
    print(f"max_tokens {max_tokens}, explain_tokens {explain_tokens}; d_model {store.d_model}")
    print(f"stores of {tokens:,} and {4 * tokens:,} tokens")
    for stage in ("04", "06"):
        (anon, rss), (anon_4x, rss_4x) = (
            peak_memory(stage, runs[scale], out / f"{stage}_{scale}x", max_tokens, explain_tokens) for scale in (1, 4)
        )
        print(
            f"{stage}: peak anonymous memory {anon:.0f} MiB on the store, {anon_4x:.0f} MiB on the 4x store (ratio "
            f"{anon_4x / anon:.3f}); peak resident set, mapped store pages included, {rss:.0f} and {rss_4x:.0f} MiB "
            f"(ratio {rss_4x / rss:.3f})"
        )


def peak_memory(stage: str, run: Path, out: Path, max_tokens: int, explain_tokens: int) -> tuple[float, float]:
    """Peak anonymous memory (what the process allocates, sampled every 20 ms) and peak resident set (VmHWM:
    with the store's memory-mapped shard pages it touched, which the kernel may drop), MiB, of a fresh process
    running ``STAGE`` on ``run``."""
    done = subprocess.run(
        [sys.executable, "-c", STAGE, str(run), str(out), stage, str(max_tokens), str(explain_tokens)],
        check=True,
        capture_output=True,
        text=True,
    )
    anon, resident = map(float, done.stdout.split()[-2:])
    return anon, resident


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--explain-tokens", type=int, default=20_000, help="below both stores' training rows")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_memory"))
    args = parser.parse_args()
    main(args.tokens, args.max_tokens, args.explain_tokens, args.out)
