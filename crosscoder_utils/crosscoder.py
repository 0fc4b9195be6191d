"""The CrossCoder: one latent dictionary read from, and decoding to, several models' activations.

Shapes (Anthropic's crosscoders and the open Gemma-2 replication)::

    W_enc [n_models, d_model, dict_size]    b_enc [dict_size]
    W_dec [dict_size, n_models, d_model]    b_dec [n_models, d_model]

The variants differ only in ``_select`` (which latents stay active) and in the sparsity term of ``losses``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from einops import einsum, rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from .config import CrossCoderConfig, explained_variance_metric
from .models import local_or_hub
from .sparse_encode import sparse_encode

POSITIVE = torch.finfo(torch.float32).tiny
"""BatchTopK keeps only scores at or above this (the smallest normal float32): never a zero score (it adds nothing)."""


def finite(weights: dict[str, torch.Tensor]) -> bool:
    """Whether every tensor of a state dict is finite (no NaN or inf)."""
    return all(bool(torch.isfinite(w).all()) for w in weights.values())


@dataclass
class Losses:
    """What ``CrossCoder.losses`` returns; every field a scalar tensor unless said otherwise."""

    loss: torch.Tensor
    """What is minimised: l2_loss + λ·penalty + aux_coeff·aux_loss."""
    l2_loss: torch.Tensor
    """Squared error summed over models and d_model, mean over the batch."""
    l1_loss: torch.Tensor
    """Σ_i f_i Σ_m ‖W_dec[i, m]‖, mean over the batch (logged for every variant)."""
    penalty: torch.Tensor
    """The sparsity term λ weighs: l1_loss for relu (each term tanh(c · it) / c with ``tanh_scale``),
    norm_penalty · l1_loss for batchtopk, designated shared latents' terms scaled by shared_penalty_ratio."""
    l0_loss: torch.Tensor
    """L0: mean number of active latents per token (monitored, not optimised)."""
    aux_loss: torch.Tensor
    """Dead-latent auxiliary loss (0 when there are no dead latents or aux_coeff is 0)."""
    x: torch.Tensor
    """[batch, n_models, d_model] the batch, and ``x_hat`` its reconstruction, both detached: the explained
    variance is computed from them when read (training reads it only at the steps it logs)."""
    x_hat: torch.Tensor

    @functools.cached_property
    def _explained(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return explained_variance(self.x, self.x_hat)

    @property
    def explained_variance(self) -> torch.Tensor:
        """1 − Σ Var(x − x̂) / Σ Var(x), summed over models and d_model."""
        return self._explained[0]

    @property
    def explained_variance_per_model(self) -> torch.Tensor:
        """[n_models]: the same per model (model 0 the base)."""
        return self._explained[1]

    def metrics(self) -> dict[str, float]:
        """Every loss as a float under its field's name, the explained variance, and per model as
        explained_variance_A (the base), explained_variance_B, ... (``config.explained_variance_metric``)."""
        out = {f.name: getattr(self, f.name).item() for f in dataclasses.fields(self) if f.name not in ("x", "x_hat")}
        out["explained_variance"] = self.explained_variance.item()
        out.update({explained_variance_metric(m): v.item() for m, v in enumerate(self.explained_variance_per_model)})
        return out


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(overall, per model [n_models]) of 1 − Σ Var(x − x̂) / Σ Var(x) for x [batch, n_models, d_model]."""
    residual_var = (x - x_hat).var(0, unbiased=False).sum(-1)
    total_var = x.var(0, unbiased=False).sum(-1)
    return 1 - residual_var.sum() / total_var.sum(), 1 - residual_var / total_var


class CrossCoder(nn.Module):
    """A crosscoder over ``n_models`` models; inputs and outputs are [batch, n_models, d_model].

    ``norm_factors`` [n_models] is 1 while training on normalised activations; ``fold_norm_factors``
    folds the factors into the weights so the crosscoder reads and writes raw activations, and keeps
    them so that decoder norms (for the penalty, BatchTopK scores and analysis) stay in normalised units.
    """

    def __init__(self, cfg: CrossCoderConfig):
        super().__init__()
        if cfg.d_model is None or cfg.n_models is None:
            raise ValueError("CrossCoderConfig needs d_model and n_models (train_crosscoder fills them from the store)")
        self.cfg = cfg
        W_dec = torch.randn(cfg.dict_size, cfg.n_models, cfg.d_model)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * cfg.dec_init_norm
        W_dec[: cfg.n_shared_latents] = W_dec[: cfg.n_shared_latents, :1].clone()  # tied: one vector per latent
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(rearrange(W_dec.clone(), "latent model d -> model d latent"))
        self.b_enc = nn.Parameter(torch.zeros(cfg.dict_size))
        self.b_dec = nn.Parameter(torch.zeros(cfg.n_models, cfg.d_model))
        self.register_buffer("norm_factors", torch.ones(cfg.n_models))
        self.sparse_path = True
        """Training BatchTopK takes the sparse path (``losses``); train_crosscoder sets it (TrainConfig.sparse_path)."""
        self.provenance: dict | None = None
        """What the crosscoder reads (models, revisions, site, layer), from the model card when ``load`` finds one."""
        self.register_buffer("threshold", torch.tensor(-1.0))  # batchtopk inference threshold; < 0: not yet learnt
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.dict_size, dtype=torch.long))
        # the partition (derived from cfg, so not saved): designated shared latents first, then each model's
        # dedicated latents; owner -1 = any model, m = dedicated to model m
        tied = torch.arange(cfg.dict_size) < cfg.n_shared_latents
        dedicated = torch.arange(cfg.dict_size) - cfg.n_shared_latents
        owner = torch.where(
            (dedicated >= 0) & (dedicated < cfg.n_models * cfg.n_dedicated),
            dedicated.div(max(cfg.n_dedicated, 1), rounding_mode="floor"),
            -1,
        )
        self.register_buffer("tied", tied, persistent=False)
        self.register_buffer("owner", owner, persistent=False)
        # each latent's weight in the L1 term: relu 1, batchtopk norm_penalty (its sparsity is the top-k; the
        # term labels exclusive latents); designated shared latents shared_penalty_ratio in both
        ordinary = 1.0 if cfg.variant == "relu" else cfg.norm_penalty
        self.register_buffer("penalty", torch.where(tied, cfg.shared_penalty_ratio, ordinary), persistent=False)
        self.penalised = bool(self.penalty.any())  # else the loss skips the term and its backward through the norms
        mask = ((owner[:, None] == -1) | (owner[:, None] == torch.arange(cfg.n_models))).float()
        self.register_buffer("decoder_mask", mask[..., None], persistent=False)
        self.register_buffer("encoder_mask", rearrange(mask, "latent model -> model 1 latent"), persistent=False)
        if cfg.n_shared_latents or cfg.n_dedicated:
            self.apply_partition_()
            # gradients projected the same way keep the constraint exact under Adam: a weight whose gradient
            # is always 0 never moves, and tied copies with equal gradients get equal moments and updates
            self.W_dec.register_hook(self._partitioned)
            self.W_enc.register_hook(lambda grad: grad * self.encoder_mask)

    def _partitioned(self, W: torch.Tensor) -> torch.Tensor:
        """W [dict_size, n_models, d_model] with the dedicated latents' other-model rows zeroed and the
        designated shared latents' rows replaced by their mean over models."""
        W = W * self.decoder_mask
        return torch.where(self.tied[:, None, None], W.mean(1, keepdim=True), W)

    @torch.no_grad()
    def apply_partition_(self) -> None:
        """Project the weights onto the partition (in training, where the norm factors are 1): after any
        direct write to W_dec or W_enc, such as data initialisation or resampling."""
        self.W_dec.copy_(self._partitioned(self.W_dec))
        self.W_enc.mul_(self.encoder_mask)

    def decoder_norms(self) -> torch.Tensor:
        """[dict_size, n_models]: ‖W_dec[i, m]‖ in normalised units."""
        return self.W_dec.norm(dim=-1) * self.norm_factors

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, dict_size]: ReLU(x · W_enc + b_enc): one matrix product over the models' concatenated
        activations, then the bias and the ReLU in place (an einsum over the models writes a [batch, dict_size]
        product per model and adds them; 0.61 s against 0.44 s at batch 2048, dict 16384 on 2 CPU cores)."""
        pre = x.flatten(1) @ self.W_enc.flatten(0, 1)
        pre += self.b_enc
        return pre.relu_()

    @torch.no_grad()  # the selection takes no gradient, on the sparse path or the dense one
    def _batch_topk(self, pre: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchTopK's training selection on pre [batch, dict_size]: each row's top-m candidate columns
        [batch, m] (m from max(2k, 32)) by score f_i·Σ_models ‖W_dec[i, model]‖, and which of them are kept
        (bool [batch, m]): the positive scores at or above the k·B-th largest of the global batch (all ranks
        together, B rows in all). Updates the threshold EMA with the smallest kept score. Designated shared
        latents score 0, so it never keeps them.

        The k·B-th score comes from the candidates (all ranks' gathered), much cheaper than a top-k over
        B·dict_size; exact unless some row had all m candidates positive and at or above it (also when the
        candidates hold fewer than k·B positive scores, k·B-th is then 0), and then m doubles until it is (one
        host sync a step). On a CPU the scores are formed 256 rows at a time, never as a second
        [batch, dict_size] matrix (faster there too); on a GPU in one go (fewer kernels)."""
        k = k or self.cfg.k
        weights, n_latents = self.selection_weights(), pre.shape[1]
        k_total = k * len(pre) * distributed.world_size()
        m = min(n_latents, max(2 * k, 32))  # at small k, rows holding over 2k kept scores are common: a pass each
        while True:
            tops = [(chunk * weights).topk(m, dim=1) for chunk in pre.split(len(pre) if pre.is_cuda else 256)]
            candidates, columns = torch.cat([t.values for t in tops]), torch.cat([t.indices for t in tops])
            top = distributed.all_gather_cat(candidates.flatten()).topk(k_total).values
            kth = top[-1]
            last = candidates[:, -1]  # a row whose last candidate is positive and kept may hold more
            undecided = ((last >= kth) & (last > 0)).any() & (m < n_latents)
            if not distributed.all_reduce(undecided.int(), "max"):
                break
            m = min(n_latents, 2 * m)
        # the EMA follows the smallest kept score: k·B-th, or the smallest positive one when fewer are positive
        # (inference then keeps what training kept); a batch with no positive score leaves it unchanged
        smallest = torch.where(top > 0, top, torch.inf).min()
        decay = self.cfg.threshold_decay
        ema = torch.where(self.threshold < 0, smallest, decay * self.threshold + (1 - decay) * smallest)
        self.threshold.copy_(torch.where(smallest.isinf(), self.threshold, ema))
        return columns, candidates >= kth.clamp(min=POSITIVE)

    @torch.no_grad()
    def _kept_entries(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Sorted flat indices of the entries ``_select`` keeps in training (the sparse path's form: no
        [batch, dict_size] mask)."""
        columns, chosen = self._batch_topk(pre, k)
        rows, slots = chosen.nonzero(as_tuple=True)
        tied_rows, tied_latents = (pre[:, : self.cfg.n_shared_latents] > 0).nonzero(as_tuple=True)
        n_latents = pre.shape[1]
        return torch.cat([rows * n_latents + columns[rows, slots], tied_rows * n_latents + tied_latents]).sort().values

    def _select(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Which latents stay active: the variant's one difference in the forward pass. BatchTopK keeps the
        batch's top k·B scores in training (``_batch_topk``; the mask scattered from its [batch, m] choice,
        with no second pass over the [batch, dict_size] scores) and the scores at or above the learnt threshold
        at inference; every active designated shared latent either way (they sit outside the top-k budget,
        see CrossCoderConfig.n_shared_latents)."""
        if self.cfg.variant == "relu":
            return pre
        if self.training:
            columns, chosen = self._batch_topk(pre, k)
            kept = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, columns, chosen)
        elif self.threshold < 0:
            raise ValueError("this batchtopk crosscoder has no inference threshold yet: train it first")
        else:
            kept = pre * self.selection_weights() >= self.threshold.clamp(min=POSITIVE)
        if self.cfg.n_shared_latents:
            kept |= (pre > 0) & self.tied
        return pre * kept

    def selection_weights(self) -> torch.Tensor:
        """[dict_size]: BatchTopK ranks f_i times this, Σ_m ‖W_dec[i, m]‖ (0 for the designated shared
        latents, which bypass the ranking)."""
        return self.decoder_norms().sum(-1) * ~self.tied

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, n_models, d_model] -> latent activations f [batch, dict_size]."""
        return self._select(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """[batch, dict_size] -> reconstruction [batch, n_models, d_model]."""
        return einsum(f, self.W_dec, "batch latent, latent model d -> batch model d") + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def _decode_bags(self, latents: torch.Tensor, weights: torch.Tensor, offsets=None) -> torch.Tensor:
        """Σ weights · W_dec[latents] per row (no bias), touching only the listed latents (embedding_bag).

        latents and weights are [batch, k], or flat [nnz] with ``offsets`` [batch] where each row starts.
        """
        out = F.embedding_bag(
            latents,
            rearrange(self.W_dec, "latent model d -> latent (model d)"),
            offsets,
            mode="sum",
            per_sample_weights=weights,
        )
        return rearrange(out, "batch (model d) -> batch model d", model=self.cfg.n_models)

    def _sparse_code(
        self, x: torch.Tensor, pre: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        """Differentiable activations [nnz] at (rows, latents), from the no-grad pre-activations."""
        return sparse_encode(x.flatten(1), self.W_enc.flatten(0, 1), self.b_enc, rows, latents, pre[rows, latents])

    def losses(self, x: torch.Tensor, l1_coeff: float | None = None, k: int | None = None) -> Losses:
        """All loss terms on a batch x [batch, n_models, d_model]; in training mode it also updates the
        BatchTopK threshold and the dead-latent counts. ``l1_coeff`` and ``k`` override the config's (schedules).

        Training BatchTopK takes the sparse path (unless ``sparse_path`` is off): the selection runs on no-grad
        pre-activations (float32, also under autocast), then only the kept latents are encoded with gradients
        (``sparse_encode``) and decoded (``_decode_bags``)."""
        cfg = self.cfg
        l1_coeff = cfg.l1_coeff if l1_coeff is None else l1_coeff
        if cfg.variant == "batchtopk" and self.training and self.sparse_path:
            with torch.no_grad():
                pre = self.pre_activations(x).float()
                flat = self._kept_entries(pre, k)
            rows, latents = flat // cfg.dict_size, flat % cfg.dict_size
            values = self._sparse_code(x, pre, rows, latents)
            offsets = torch.searchsorted(rows, torch.arange(len(x), device=x.device))
            x_hat = self._decode_bags(latents, values, offsets) + self.b_dec
            activity = torch.zeros(cfg.dict_size, dtype=values.dtype, device=x.device).index_add(0, latents, values)
            l0_loss = (values > 0).sum() / len(x)
        else:
            pre = self.pre_activations(x)
            f = self._select(pre, k)
            x_hat = self.decode(f)
            activity = f.sum(0)
            l0_loss = torch.count_nonzero(f) / len(x)
        # activity [dict_size]: each latent's activations summed over the batch
        norms = self.decoder_norms().sum(-1)
        l1_loss = (activity * norms).sum() / len(x)
        if not self.penalised:
            penalty = x.new_zeros(())
        elif cfg.variant == "relu" and cfg.tanh_scale is not None:  # Σ tanh(c · f_i Σ_m ‖W_dec[i, m]‖) / c
            penalty = (torch.tanh(f * norms * cfg.tanh_scale) * self.penalty).sum() / cfg.tanh_scale / len(x)
        else:
            penalty = (activity * norms * self.penalty).sum() / len(x)
        l2_loss = (x - x_hat).pow(2).sum((1, 2)).mean()
        aux_loss = self._aux_loss(x, x - x_hat, pre.detach()) if cfg.aux_coeff > 0 else x.new_zeros(())
        if self.training:
            with torch.no_grad():
                fired_anywhere = distributed.all_reduce((activity > 0).int(), "max").bool()
                self.tokens_since_fired += len(x) * distributed.world_size()
                self.tokens_since_fired[fired_anywhere] = 0
        loss = l2_loss + cfg.aux_coeff * aux_loss + l1_coeff * penalty
        return Losses(loss, l2_loss, l1_loss, penalty, l0_loss, aux_loss, x.detach(), x_hat.detach())

    def dead_latents(self) -> torch.Tensor:
        """bool [dict_size]: latents that have not fired for ``dead_tokens`` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def _aux_loss(self, x: torch.Tensor, residual: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """Dead latents' top-k_aux pre-activations reconstruct the residual, normalised by its variance."""
        dead = self.dead_latents()
        n_dead = int(dead.sum())  # the step's one host sync for AuxK
        if not n_dead:
            return residual.new_zeros(())
        k_aux = min(self.cfg.k_aux, n_dead)
        latents = (pre * dead).topk(k_aux, dim=1).indices
        rows = torch.arange(len(x), device=x.device).repeat_interleave(k_aux)
        values = self._sparse_code(x, pre, rows, latents.flatten())
        residual_hat = self._decode_bags(latents, values.view(len(x), k_aux))
        # the residual's variance over the global batch (all ranks), and this rank's share of the error
        # scaled by the world size, so that the ranks' average (DDP) is the single-process loss
        residual = residual.detach()
        sums = distributed.all_reduce(torch.stack([residual.double().sum(0), residual.double().pow(2).sum(0)]))
        n_total = len(x) * distributed.world_size()
        variance_sum = (sums[1] - sums[0].pow(2) / n_total).sum().float().clamp(min=1e-12)
        return (residual - residual_hat).pow(2).sum() * distributed.world_size() / variance_sum

    def fold_norm_factors(self, factors: torch.Tensor) -> "CrossCoder":
        """A copy that reads and writes raw activations: x_norm = x_raw · factors[m]."""
        if not torch.equal(self.norm_factors, torch.ones_like(self.norm_factors)):
            raise ValueError("norm factors are already folded into this crosscoder")
        folded = CrossCoder(self.cfg).to(self.W_enc.device).train(self.training)
        folded.load_state_dict(self.state_dict())
        factors = factors.to(self.W_enc)
        with torch.no_grad():
            folded.W_enc.mul_(factors[:, None, None])
            folded.W_dec.div_(factors[None, :, None])
            folded.b_dec.div_(factors[:, None])
            folded.norm_factors.copy_(factors)
        return folded

    def save(self, directory: str | Path) -> None:
        """``crosscoder.safetensors`` (weights and buffers) and ``cfg.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
            directory / "crosscoder.safetensors",
        )
        self.cfg.save(directory / "cfg.json")

    def _check_cfg(self, directory: Path) -> None:
        """Refuse a cfg.json that does not describe the weights loaded (edited by hand, or another run's), naming
        the field: the variant against the BatchTopK threshold (set only by batchtopk training), the dedicated
        latents against the decoder rows of exactly zero (only theirs, in the other models), the designated shared
        latents against the decoder rows equal in every model (in normalised units)."""
        cfg, W = self.cfg, self.W_dec.detach() * self.norm_factors[None, :, None]
        mismatch = lambda field, found: ValueError(
            f"{directory / 'cfg.json'} does not match {directory / 'crosscoder.safetensors'}: {field} is "
            f"{getattr(cfg, field)!r} there, but the weights {found}; restore cfg.json (or load the run it came from)"
        )
        learnt = bool(self.threshold >= 0)
        if learnt != (cfg.variant == "batchtopk"):
            raise mismatch("variant", "hold a BatchTopK threshold" if learnt else "hold no BatchTopK threshold")
        zero = (W == 0).all(-1)  # [latent, model]
        if not torch.equal(zero, self.decoder_mask[..., 0] == 0):
            owned = int((zero.sum(1) == cfg.n_models - 1).sum()) // cfg.n_models
            raise mismatch("n_dedicated", f"have {owned} latents per model whose decoder is zero in every other model")
        tied = torch.isclose(W, W[:, :1], rtol=1e-5, atol=0).all(-1).all(-1) & ~zero.any(1)
        if cfg.n_models > 1 and not torch.equal(tied, self.tied):
            raise mismatch(
                "n_shared_latents", f"have {int(tied.sum())} latents with one decoder vector for every model"
            )

    @classmethod
    def load(cls, directory_or_hub_id: str | Path, device: str = "cpu") -> "CrossCoder":
        """Read what ``save`` wrote, from a local directory or a Hub model repository (see
        ``models.local_or_hub``: a missing local path is refused, never looked up on the Hub), and, when it
        holds a model card (``hub.push_crosscoder``'s README.md), what the crosscoder reads into ``provenance``."""
        directory = local_or_hub(directory_or_hub_id)
        if isinstance(directory, str):
            from huggingface_hub import snapshot_download

            patterns = ["crosscoder.safetensors", "cfg.json", "README.md"]
            directory = Path(snapshot_download(directory, allow_patterns=patterns))
        try:
            model = cls(CrossCoderConfig.load(directory / "cfg.json"))
            weights = load_file(directory / "crosscoder.safetensors", device=device)
            model.load_state_dict(weights)
        except (ValueError, TypeError, RuntimeError, OSError, SafetensorError) as error:  # JSON, field, file, shape
            if isinstance(error, FileNotFoundError):
                raise
            raise ValueError(
                f"the crosscoder in {directory} cannot be read ({error}): cfg.json or crosscoder.safetensors is damaged"
            ) from error
        if not finite(weights):
            raise ValueError(f"{directory / 'crosscoder.safetensors'} holds non-finite weights (NaN or inf)")
        model._check_cfg(directory)
        card = directory / "README.md"
        if card.exists():
            model.provenance = yaml.safe_load(card.read_text().split("---\n", 2)[1]).get("crosscoder")
        return model.to(device).eval()
