"""The other model-diffing methods, scored beside the crosscoder on the same held-out tokens.

Each method turns a run's store (and models) into *candidates*: latents, components or directions, in the
method's own ranking order, each with a per-token score on the held-out (``val``) rows. ``score_methods``
asks of every method and planted behaviour whether one of its top candidates separates the behaviour's
tokens (best F1 over thresholds of its score), so every method is judged by one rule:

* ``crosscoder``: the top latents of 04's difference ranking (one per firing pattern), scored by their
  activations;
* ``diff-SAE``: a BatchTopK sparse autoencoder trained on Δx = x_ft − x_base with the crosscoder's dictionary
  size and tokens (the same training code: a crosscoder of one model), its latents ranked like 04's;
* ``PCA of Δx``: the top principal components of Δx, scored by each token's projection;
* ``ADL``: the Activation Difference Lens (Minder et al. 2026): the mean Δx over the first ``n_positions``
  positions of documents unrelated to the fine-tune, one direction per position, scored by each token's
  projection on it, and read through each model's unembedding (``logit_lens``);
* ``per-token KL`` and ``‖Δx‖``: the token map itself, KL(ft ‖ base) of the next-token distributions and the
  norm of the activation difference, one candidate each.

Without labels (any pair) ``describe`` gives each method's top candidates an explanation and contexts, and
``agreement`` groups the candidates of several methods that point at the same tokens. Everything is in
normalised units (the crosscoder's) but ADL, which reads raw differences as published; numbers only, figures
in plots.py. One module per reason to change:

- ``baselines``: each method as a ``Method`` (the crosscoder's top, the diff-SAE, PCA, ADL, the token maps);
- ``difference_source``: Δx of a store served to training as it is read (the diff-SAE's data);
- ``scoring``: one rule against labelled tokens, methods.csv;
- ``candidates``: candidates described without labels, and where methods agree, candidates.csv;
- ``compare``: ``run_methods`` (the one list of the methods), ``compare`` and the lines 06 prints.
"""

from .baselines import (
    DifferenceLens,
    Method,
    adl_method,
    crosscoder_method,
    diff_sae_method,
    difference_lens,
    logit_lens,
    pca_method,
    token_map_methods,
    training_seconds,
)
from .candidates import CANDIDATE_COLUMNS, N_AGREE, Candidate, agreement, describe, top_tokens, write_candidates_csv
from .compare import (
    Comparison,
    agreement_lines,
    candidate_table,
    compare,
    found_counts,
    logit_lens_lines,
    logit_lens_summary,
    outcomes,
    over_seeds,
    run_methods,
    score_table,
    trained_methods,
)
from .difference_source import DifferenceSource
from .scoring import (
    COLUMNS,
    Cuts,
    MethodScore,
    best_cuts,
    listed_tokens,
    read_methods_csv,
    score_logit_lens,
    score_methods,
    seconds_per_method,
    write_methods_csv,
)

__all__ = [
    "CANDIDATE_COLUMNS",
    "COLUMNS",
    "Candidate",
    "Cuts",
    "Comparison",
    "DifferenceLens",
    "DifferenceSource",
    "Method",
    "MethodScore",
    "N_AGREE",
    "adl_method",
    "agreement",
    "agreement_lines",
    "best_cuts",
    "candidate_table",
    "compare",
    "crosscoder_method",
    "describe",
    "diff_sae_method",
    "difference_lens",
    "found_counts",
    "listed_tokens",
    "logit_lens",
    "logit_lens_lines",
    "logit_lens_summary",
    "outcomes",
    "over_seeds",
    "pca_method",
    "read_methods_csv",
    "run_methods",
    "score_logit_lens",
    "score_methods",
    "score_table",
    "seconds_per_method",
    "token_map_methods",
    "top_tokens",
    "trained_methods",
    "training_seconds",
    "write_candidates_csv",
    "write_methods_csv",
]
