"""Explanations (``crosscoder_utils.analysis.explanations.explain``) at scale: every live latent's rule search,
on held-out tokens of a store with token ids and sequences, against the size of the problem.

Synthetic firings with the structure the search looks for: on a Zipf-distributed token stream (vocabulary
50,257, sequences of 128), each token sets off ``l0`` latents chosen by its id and its previous token's, each
with a random activation. The demo's own run (256 latents, 10,000 held-out tokens) is timed by 04.

Run: .venv/bin/python bench/bench_explanations.py [--tokens 1000000] [--latents 16384] [--l0 16]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crosscoder_utils import ActivationStore
from crosscoder_utils.analysis.encoding import Encoded
from crosscoder_utils.analysis.explanations import explain


def problem(folder: Path, n_tokens: int, dict_size: int, l0: int) -> tuple[ActivationStore, Encoded]:
    generator = np.random.default_rng(0)
    ids = np.minimum(generator.zipf(1.2, n_tokens), 50_257) - 1
    seq, pos = np.arange(n_tokens) // 128, np.arange(n_tokens) % 128
    store = ActivationStore.from_arrays(
        folder / "store", torch.zeros(n_tokens, 2, 1), ids, val_fraction=0.999, positions=(seq, pos)
    )
    rows = np.arange(store.split_range("val").start, n_tokens)
    token_ids = torch.from_numpy(ids[rows])
    previous = torch.from_numpy(np.where(pos[rows] > 0, ids[rows - 1], 0))
    token = torch.arange(len(rows)).repeat_interleave(l0)
    step = torch.arange(l0).repeat(len(rows))
    source = torch.where(step % 2 == 0, token_ids[token], previous[token] * 31 + token_ids[token])
    pairs = torch.unique(torch.stack([token, (source * 97 + step * 7919) % dict_size], 1), dim=0)  # each once
    value = torch.rand(len(pairs), generator=torch.Generator().manual_seed(0)) + 0.1
    empty = torch.zeros(dict_size, 2, 1, dtype=torch.float64)
    encoded = Encoded(
        rows,
        pairs[:, 0],
        pairs[:, 1],
        value,
        dict_size,
        torch.zeros(2),
        torch.zeros(len(rows), 2),
        empty[:, 0, 0],
        empty,
        empty,
    )
    return store, encoded


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--l0", type=int, default=16)
    args = parser.parse_args()
    print(f"CPU, {torch.get_num_threads()} threads")
    print(
        f"{'held-out tokens':>15} {'latents':>8} {'firings':>11} {'seconds':>8} {'µs / firing':>12} {'with a rule':>12}"
    )
    for n_tokens in sorted({args.tokens // 10, args.tokens}):
        with tempfile.TemporaryDirectory() as tmp:
            store, encoded = problem(Path(tmp), n_tokens, args.latents, args.l0)
            start = time.perf_counter()
            explanations = explain(encoded, store)
            seconds = time.perf_counter() - start
            live = ~torch.isnan(explanations.f1)
            ruled = sum(text not in ("", "no simple rule") for text in explanations.text)
            print(
                f"{encoded.n_tokens:>15,} {args.latents:>8,} {len(encoded.latent):>11,} {seconds:>8.1f}"
                f" {seconds / len(encoded.latent) * 1e6:>12.2f} {ruled:>6} of {int(live.sum())}",
                flush=True,
            )


if __name__ == "__main__":
    main()
