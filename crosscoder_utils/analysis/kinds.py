"""The one kind rule: how much of each latent each model holds (decoder norms, or Latent Scaling where it
applies), and from that, each latent's kind against the base: ``<role>-only``, ``base-only``, ``changed``,
``shared`` or ``dead``. 04's tables, latents.csv, the dashboard and 05's ground-truth scoring all read it here."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from einops import einsum

from ..config import CHANGED_COSINE, EXCLUSIVE_SHARE, model_roles
from ..crosscoder import CrossCoder
from .encoding import Encoded

if TYPE_CHECKING:
    from .ranking import DifferenceTable


@torch.no_grad()
def relative_decoder_norms(cc: CrossCoder) -> torch.Tensor:
    """[dict_size, n_models]: each model's share ‖d_m‖ / Σ_m' ‖d_m'‖ of a latent's decoder norm,
    in normalised units. For two models column 1 is the usual ‖d_ft‖ / (‖d_base‖ + ‖d_ft‖)."""
    norms = cc.decoder_norms()
    return norms / norms.sum(-1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def model_shares(cc: CrossCoder, encoded: Encoded | None = None) -> torch.Tensor:
    """[dict_size, n_models]: how much of each latent each model holds, summing to 1 over the models.

    Without data, the decoder-norm shares (``relative_decoder_norms``). With ``encoded`` (``encode``: the
    latents' sums over a split), a latent that fires is measured by Latent Scaling instead: each model's β^ε along the
    latent's largest decoder vector (``LatentScaling``), clamped at 0, over their sum. A decoder half can
    hold norm without holding the latent: it fits whatever else the model's activations hold where the
    latent fires, as BatchTopK's halves for features exclusive to the other model do (nothing pulls them to
    zero); Latent Scaling asks whether the model's activations hold the latent's own direction.

    Latent Scaling decides only where it applies: where one model holds at least 3/4 of the decoder norm (a
    latent with substantial decoders in two models, shared or changed, writes a different vector in each,
    and β along one of them says nothing about the other), and where it reproduces the latent in its own
    model: β^ε there at least 0.5 and every model's at most 2 (in the owner it is 1 plus the error's
    correlation with the latent). A weak latent whose own error outweighs it gets β of any size and sign,
    which made 5 % of relu's exclusive labels false on the medium ground truth (bench/RESULTS.md). Elsewhere,
    and for latents that never fire, the decoder norms decide."""
    shares = relative_decoder_norms(cc).cpu()
    if encoded is None:
        return shares
    share, owner = shares.max(-1)
    beta = _betas(cc, encoded, owner)["error"]  # [n_models, dict_size]
    own = beta.gather(0, owner[None]).squeeze(0)
    applies = (encoded.f_squared > 0) & (share >= 0.75) & (own >= 0.5) & (beta <= 2).all(0)
    beta = beta.T.clamp(min=0)
    return torch.where(applies[:, None], beta / beta.sum(-1, keepdim=True).clamp(min=1e-12), shares)


def latent_kinds(
    cc: CrossCoder,
    exclusive_share: float = EXCLUSIVE_SHARE,
    encoded: Encoded | None = None,
    models: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """int64 [dict_size]: m where model m holds at least ``exclusive_share`` of the latent (``model_shares``:
    by Latent Scaling with ``encoded``, else by decoder norm), else -1 (shared). With ``models``, the shares
    of those models only, renormalised (a pair of a base and one fine-tune among several). For two models:
    base-only when the fine-tune's share is ≤ 1 − share, fine-tuned-only when ≥ share."""
    shares = model_shares(cc, encoded)
    index = torch.arange(cc.cfg.n_models) if models is None else torch.tensor(models)
    shares = shares[:, index] / shares[:, index].sum(-1, keepdim=True).clamp(min=1e-12)
    share, owner = shares.max(dim=-1)
    return torch.where(share >= exclusive_share, index[owner], -1)


def pair_kinds(
    cc: CrossCoder,
    encoded: Encoded,
    model_index: int = 1,
    exclusive_share: float = EXCLUSIVE_SHARE,
    changed_cosine: float = CHANGED_COSINE,
) -> list[str]:
    """Each latent's kind between the base and fine-tune ``model_index``: ``dead`` never fires on the encoded
    tokens; ``<role>-only`` / ``base-only`` holds at least ``exclusive_share`` of the pair's share
    (``latent_kinds``: Latent Scaling where it applies, else decoder norms); ``changed`` present in both but
    with decoder cosine below ``changed_cosine`` (the fine-tune changed what the latent writes); ``shared``
    otherwise."""
    owner = latent_kinds(cc, exclusive_share, encoded, (0, model_index)).tolist()
    cosine = decoder_cosines(cc, 0, model_index).tolist()
    frequency = encoded.frequency.tolist()
    n_models = cc.cfg.n_models
    return [
        "dead"
        if frequency[i] == 0
        else kind_name(owner[i], n_models)
        if owner[i] >= 0
        else "changed"
        if cosine[i] < changed_cosine
        else "shared"
        for i in range(cc.cfg.dict_size)
    ]


def kind_name(kind: int, n_models: int) -> str:
    """``shared`` for -1, else ``<role>-only`` (``base-only``, ``finetuned-only``) for model ``kind``."""
    return "shared" if kind == -1 else f"{model_roles(n_models)[kind]}-only"


def kind_counts(kinds: torch.Tensor, n_models: int) -> dict[str, int]:
    """Latents of each kind, by name."""
    return {kind_name(kind, n_models): int((kinds == kind).sum()) for kind in range(-1, n_models)}


@torch.no_grad()
def decoder_cosines(cc: CrossCoder, first: int = 0, second: int = 1) -> torch.Tensor:
    """[dict_size]: cosine between each latent's decoder vectors for two models."""
    return F.cosine_similarity(cc.W_dec[:, first], cc.W_dec[:, second], dim=-1)


@torch.no_grad()
def random_pair_cosines(
    cc: CrossCoder, n: int = 10_000, seed: int = 0, first: int = 0, second: int = 1
) -> torch.Tensor:
    """[n]: cosines between model-``first`` and model-``second`` decoder vectors of two different latents (baseline)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(cc.cfg.dict_size, (n,), generator=g)
    j = (i + torch.randint(1, cc.cfg.dict_size, (n,), generator=g)) % cc.cfg.dict_size
    return F.cosine_similarity(cc.W_dec[i, first], cc.W_dec[j, second], dim=-1)


class LatentScaling(NamedTuple):
    """Closed-form β per latent (Minder et al. 2025, 'Overcoming Sparsity Artifacts in Crosscoders').

    For a latent j exclusive to model o with decoder direction d = W_dec[j, o], and a target y_m(t) per
    model m, β_j,m = Σ_t f_j(t) ⟨d, y_m(t)⟩ / (‖d‖² Σ_t f_j(t)²): how much of f_j·d the target holds.
    Targets: the activation x_m; the reconstruction without the latent, x̂_m − f_j W_dec[j, m]; and the
    error with the latent's own contribution, x_m − x̂_m + f_j W_dec[j, m]. For the other model e,
    ν^ε = β^error_e / β^error_o and ν^r = β^reconstruction_e / β^reconstruction_o. Both near 0: the
    latent is genuinely exclusive. High ν^ε: the other model's error still holds it (Complete
    Shrinkage); high ν^r: other latents reconstruct it in the other model (Latent Decoupling).
    """

    latents: torch.Tensor
    """[J] the latents scaled."""
    beta: dict
    """target name -> [n_models, J] β for each model."""
    nu_error: torch.Tensor
    """[J] ν^ε."""
    nu_reconstruction: torch.Tensor
    """[J] ν^r."""


@torch.no_grad()
def _betas(cc: CrossCoder, encoded: Encoded, owners: torch.Tensor, latents: torch.Tensor | None = None) -> dict:
    """Target name -> [n_models, J] β of ``latents`` (None: every latent, reading the sums without a copy)
    along each one's decoder vector in model ``owners[j]``."""
    pick = (lambda t: t) if latents is None else (lambda t: t[latents])
    decoders = pick(cc.W_dec.detach().cpu()).double()  # [J, n_models, d]
    direction = decoders[torch.arange(len(owners)), owners.cpu()]
    own = einsum(direction, decoders, "j d, j m d -> m j")  # ⟨d, W_dec[j, m]⟩
    on_x = einsum(pick(encoded.f_x), direction, "j m d, j d -> m j")  # Σ_t f_j ⟨d, x_m⟩
    on_hat = einsum(pick(encoded.f_x_hat), direction, "j m d, j d -> m j")
    f_squared = pick(encoded.f_squared)
    contribution = f_squared * own  # Σ_t f_j ⟨d, f_j W_dec[j, m]⟩
    sums = {"activation": on_x, "reconstruction": on_hat - contribution, "error": on_x - on_hat + contribution}
    denominator = direction.pow(2).sum(-1) * f_squared
    return {name: (value / denominator).float() for name, value in sums.items()}


def latent_scaling(cc: CrossCoder, encoded: Encoded, latents, owner: int, other: int) -> LatentScaling:
    latents = torch.as_tensor(latents, dtype=torch.long)
    beta = _betas(cc, encoded, torch.full_like(latents, owner), latents)
    ratio = lambda name: beta[name][other] / beta[name][owner]
    return LatentScaling(latents, beta, ratio("error"), ratio("reconstruction"))


KINDS = ("finetuned-only", "base-only", "changed", "shared", "dead")
"""The kinds of latent in a difference table (for a fine-tune other than the first, ``<role>-only``)."""


def exclusive_latent_scaling(cc: CrossCoder, encoded: Encoded, table: DifferenceTable) -> dict[str, LatentScaling]:
    """Latent Scaling of the table's live exclusive latents, by kind (``<role>-only`` and ``base-only``)."""
    role = model_roles(cc.cfg.n_models)[table.model_index]
    scalings = {}
    for kind, owner, other in ((f"{role}-only", table.model_index, 0), ("base-only", 0, table.model_index)):
        latents = [i for i, k in enumerate(table.kind) if k == kind]
        if latents:
            scalings[kind] = latent_scaling(cc, encoded, latents, owner, other)
    return scalings


def genuine(scaling: LatentScaling, nu_threshold: float) -> torch.Tensor:
    """bool [J]: latents whose |ν^ε| and |ν^r| are both below ``nu_threshold`` (genuinely exclusive)."""
    return (scaling.nu_error.abs() < nu_threshold) & (scaling.nu_reconstruction.abs() < nu_threshold)


def genuine_counts(scalings: dict[str, LatentScaling], nu_threshold: float) -> dict[str, int]:
    """Kind -> how many of its latents are genuine (``genuine``)."""
    return {kind: int(genuine(scaling, nu_threshold).sum()) for kind, scaling in scalings.items()}
