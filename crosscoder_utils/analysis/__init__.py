"""Reading a trained crosscoder: what the fine-tune changed. One module per reason to change:

- ``encoding``: the one pass over held-out tokens every statistic reads (``Encoded``);
- ``health``: dead latents, duplicate groups, effective size;
- ``kinds``: the one kind rule (decoder norms, Latent Scaling, decoder cosine);
- ``ranking``: the difference ranking, its distinct top, the findings and the verdict;
- ``lm``: per-token KL, the difference explained, the spliced-in loss;
- ``causal``: is a latent what changed the model? patching (the KL it closes) and steering;
- ``explanations``: a rule for every latent with its detection F1, and phrase groups;
- ``contexts``: contexts and activation samples of latents;
- ``planted``: scoring against the organism's planted behaviours;
- ``report``: the files 04 writes (latents.csv, summary.json) and their readers;
- ``pipeline``: ``analyse``, what 04 and the dashboard run.

Numbers only: the figures are in plots.py. Everything is in normalised units (the space the crosscoder was
trained in), on the store's held-out ``val`` split unless said otherwise. The names below are the package's
public surface; notebooks import ``crosscoder_utils.analysis as A``.
"""

from .causal import (
    Closed,
    LatentPatch,
    Patching,
    Steering,
    causal_sentence,
    causal_tests,
    evidence,
    patch,
    steer,
    with_causal,
)
from .contexts import LatentSamples, context, latent_samples
from .encoding import Encoded, encode
from .explanations import Explanations, PhraseGroup, explain, phrase_groups
from .health import Health, dictionary_health
from .kinds import (
    KINDS,
    LatentScaling,
    decoder_cosines,
    exclusive_latent_scaling,
    genuine,
    genuine_counts,
    kind_counts,
    kind_name,
    latent_kinds,
    latent_scaling,
    model_shares,
    pair_kinds,
    random_pair_cosines,
    relative_decoder_norms,
)
from .lm import (
    SplicedLoss,
    TokenDivergence,
    difference_explained,
    difference_explained_by_top,
    divergent_tokens,
    most_divergent,
    spliced_loss,
    token_divergence,
)
from .pipeline import Analysis, analyse, reanalyse
from .planted import EXPECTED_KINDS, BehaviourMatch, Detection, best_latents, detection, main_behaviours
from .ranking import (
    Answer,
    DifferenceTable,
    Finding,
    RoleReport,
    TopLatents,
    answer,
    describe_groups,
    difference_scores,
    difference_table,
    distinct_top,
    findings,
    planted_found,
    ranking,
    role_reports,
    verdict,
)
from .report import (
    PATCH_COLUMNS,
    map_labels,
    planted_rows,
    read_latents_csv,
    read_summary,
    readable,
    write_latents_csv,
    write_latents_csvs,
    write_summary,
)

__all__ = [
    "Analysis",
    "Answer",
    "BehaviourMatch",
    "Closed",
    "Detection",
    "DifferenceTable",
    "EXPECTED_KINDS",
    "Encoded",
    "Explanations",
    "Finding",
    "Health",
    "KINDS",
    "LatentPatch",
    "LatentSamples",
    "LatentScaling",
    "PATCH_COLUMNS",
    "Patching",
    "PhraseGroup",
    "RoleReport",
    "SplicedLoss",
    "Steering",
    "TokenDivergence",
    "TopLatents",
    "analyse",
    "answer",
    "best_latents",
    "causal_sentence",
    "causal_tests",
    "context",
    "decoder_cosines",
    "describe_groups",
    "detection",
    "dictionary_health",
    "difference_explained",
    "difference_explained_by_top",
    "difference_scores",
    "difference_table",
    "distinct_top",
    "divergent_tokens",
    "encode",
    "evidence",
    "exclusive_latent_scaling",
    "explain",
    "findings",
    "genuine",
    "genuine_counts",
    "kind_counts",
    "kind_name",
    "latent_kinds",
    "latent_samples",
    "latent_scaling",
    "main_behaviours",
    "map_labels",
    "model_shares",
    "most_divergent",
    "pair_kinds",
    "patch",
    "phrase_groups",
    "planted_found",
    "planted_rows",
    "random_pair_cosines",
    "ranking",
    "read_latents_csv",
    "read_summary",
    "readable",
    "reanalyse",
    "relative_decoder_norms",
    "role_reports",
    "spliced_loss",
    "steer",
    "token_divergence",
    "verdict",
    "with_causal",
    "write_latents_csv",
    "write_latents_csvs",
    "write_summary",
]
