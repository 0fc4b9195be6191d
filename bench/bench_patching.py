"""What 04's patching and steering (``analysis.causal``) cost on a run: seconds per latent, measured side by side
in one process.

``patch`` runs one forward of one model per patched set and batch, so its cost grows by two forwards per latent
(the latent and its random direction) and batch: the bench times the top 1 and the top n (no top-k sets, one
random draw each; the top 1's time scaled to the top n's documents) and reports the difference per latent; then
04's default (the top n with the sets k = 1, 2, 5, 10, 20 and 3 random draws each) and ``steer`` for one latent
(its top 2 contexts, α 0, 1, 2, 4, 8 new tokens).

Run after `make demo` (the organism's run; any run with its models works):
    python bench/bench_patching.py [run_dir] [n]
"""

import sys
import time

import torch

from crosscoder_utils import analysis as A
from crosscoder_utils.config import AnalysisConfig


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main(run_dir: str = "outputs/runs/organism-relu", n: int = 20) -> None:
    torch.manual_seed(0)
    analysis = A.analyse(run_dir, AnalysisConfig(explain_tokens=0), "cpu")
    table = next(iter(analysis.tables.values()))
    top = table.order[:n].tolist()
    one, t_one = timed(lambda: A.patch(analysis, top[:1], set_sizes=(1,), n_random=1))
    many, t_many = timed(lambda: A.patch(analysis, top, set_sizes=(1,), n_random=1))
    full, t_full = timed(lambda: A.patch(analysis, top))
    steered, t_steer = timed(lambda: A.steer(analysis, top[0]))
    # each latent's top document joins the first 32: the top n patch more documents than the top 1, and the time
    # grows with the documents, so the top 1's time is scaled to the top n's documents before the difference
    per_latent = (t_many - t_one * many.n_documents / one.n_documents) / (n - 1)
    print(f"run {run_dir}; {many.n_documents} documents, {many.n_tokens:,} kept tokens (top 1: {one.n_documents})")
    print(f"patch, top 1: {t_one:.1f} s; top {n}: {t_many:.1f} s; per latent {per_latent:.2f} s")
    print(f"patch, 04's default (top {n}, sets {[len(s.latents) for s in full.sets]}, 3 draws): {t_full:.1f} s")
    print(f"steer, one latent ({len(steered)} contexts, 4 α, 8 tokens): {t_steer:.1f} s")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or []), *(int(a) for a in sys.argv[2:3]))
