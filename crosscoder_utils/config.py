"""Settings of each stage as dataclasses with a docstring under every field.

The field names are the notebooks' parameter names, so ``papermill -p NAME VALUE`` means the same
thing in every notebook. Every config round-trips through JSON and checks itself on construction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from operator import ge, gt, le, lt
from pathlib import Path
from typing import ClassVar

SITES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
STORE_DTYPES = ("float32", "float16", "bfloat16")
MODEL_DTYPES = (*STORE_DTYPES, "float64")


FIELD_TYPES = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "list": (list,),
    "dict": (dict,),
    "None": (type(None),),
}
"""The Python types each annotation of a config field accepts."""


def model_roles(n_models: int) -> list[str]:
    """The name of each model by its role: ``base`` (model 0), then ``finetuned`` (or ``finetuned_1``,
    ``finetuned_2`` ... when there are several fine-tunes). Latent kinds, figures and reports use these; the
    training metrics name the models by letter (``metric_letter``)."""
    return ["base"] + (["finetuned"] if n_models == 2 else [f"finetuned_{m}" for m in range(1, n_models)])


def metric_letter(model_index: int) -> str:
    """The letter that names model ``model_index`` in the training metrics: ``A`` the base (model 0), ``B`` the
    (first) fine-tune, ``C`` ... (after ``Z``: ``AA``, ``AB`` ...)."""
    letters, n = "", model_index + 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("A") + r) + letters
    return letters


def explained_variance_metric(model_index: int) -> str:
    """The training metric of model ``model_index``'s explained variance: ``explained_variance_A`` (the base),
    ``explained_variance_B`` ... (metrics.jsonl, wandb, the model card)."""
    return f"explained_variance_{metric_letter(model_index)}"


class ConfigBase:
    """JSON round-trip and construction from notebook parameters for the dataclasses below."""

    runtime_fields: ClassVar[tuple[str, ...]] = ()
    """Fields that say how a job runs, not what it makes (left out of ``settings``)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def settings(self) -> dict:
        """What identifies the result: every field but the runtime ones. A directory is reused only for
        the same settings (``files.check_same_settings``)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.runtime_fields}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, values: dict):
        """Build from a dict, refusing unknown keys (a misspelt parameter is an error, not ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))

    def check_types(self) -> None:
        """Refuse a field whose value is not of its annotated type (an int field given 2.5 or "5"; a float
        field takes an int)."""
        for f in dataclasses.fields(self):
            allowed = tuple(t for part in str(f.type).split("|") for t in FIELD_TYPES.get(part.strip(), (object,)))
            value = getattr(self, f.name)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise TypeError(f"{f.name} must be {f.type}, got {value!r} ({type(value).__name__})")

    @classmethod
    def from_namespace(cls, namespace: dict):
        """Pick this config's fields out of a namespace (a notebook's globals after its parameters cell)."""
        return cls(**{f.name: namespace[f.name] for f in dataclasses.fields(cls) if f.name in namespace})


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def check_range(
    name: str, value, at_least=None, above=None, at_most=None, below=None, optional=False, integer=False
) -> None:
    """Refuse a ``value`` that is not a finite number within the bounds given: ``at_least`` or ``above`` (lower,
    inclusive or exclusive), ``at_most`` or ``below`` (upper); ``integer``: an int. ``optional``: None is allowed,
    where it stands for an automatic default. NaN and inf are refused whatever the bounds."""
    if value is None and optional:
        return
    bounds = [
        (bound, sign, test)
        for bound, sign, test in ((at_least, ">=", ge), (above, ">", gt), (at_most, "<=", le), (below, "<", lt))
        if bound is not None
    ]
    kind = numbers.Integral if integer else numbers.Real
    if (
        isinstance(value, kind)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and all(t(value, b) for b, _, t in bounds)
    ):
        return
    if len(bounds) == 2:
        (low, low_sign, _), (high, high_sign, _) = bounds
        valid = f"in {'[' if low_sign == '>=' else '('}{low}, {high}{']' if high_sign == '<=' else ')'}"
    else:
        valid = f"{bounds[0][1]} {bounds[0][0]}"
    raise ValueError(f"{name} must be {'an integer ' * integer}{valid}{' or None' if optional else ''}, got {value!r}")


@dataclass
class CollectConfig(ConfigBase):
    """What 01_collect stores: which models, which site, which text, how many tokens."""

    runtime_fields: ClassVar[tuple[str, ...]] = ("device",)

    base_model: str = "outputs/organism/base"
    """Hub id or local directory of the base model (stored as model 0)."""
    finetuned_model: str = "outputs/organism/finetuned"
    """Hub id or local directory of the fine-tuned model (stored as model 1)."""
    layer: int = 2
    """Block index of the site (0-based)."""
    site: str = "resid_post"
    """One of resid_pre, resid_post, mlp_out, attn_out, or an explicit module path such as
    ``model.layers.13.mlp`` (its output is read)."""
    dataset: str | list = "outputs/organism/corpus"
    """Hub dataset name, local dataset directory (``save_to_disk`` or data files), or a list of strings."""
    split: str = "train"
    """Dataset split to read."""
    text_column: str = "text"
    """Column holding the text, or chat messages (a list of {role, content} dicts rendered with the
    tokenizer's chat template)."""
    n_tokens: int = 200_000
    """Number of tokens to store (after padding and exclusions are dropped)."""
    seq_len: int = 128
    """Tokens per sequence; longer documents are truncated."""
    seqs_per_batch: int = 32
    """Sequences per forward pass."""
    dtype: str = "float32"
    """Storage dtype: float32, float16 or bfloat16 (kept bit-exact as int16)."""
    model_dtype: str = "float32"
    """Dtype the models are loaded and run in."""
    device: str = "auto"
    """Device the models run on; ``auto`` picks cuda when available."""
    padding_side: str = "right"
    """Side on which shorter sequences of a batch are padded (padding is never stored)."""
    exclude_bos: bool = True
    """Drop BOS tokens: their activations are huge attention sinks that would dominate the loss."""
    exclude_first_n: int = 0
    """Also drop the first n positions of every sequence."""
    exclude_token_ids: list = field(default_factory=list)
    """Also drop these token ids wherever they occur (for example chat-template tokens)."""
    seqs_per_shard: int | None = None
    """Sequences per on-disk shard, a multiple of seqs_per_batch; a killed collection resumes after the last
    complete shard. None: the multiple of seqs_per_batch nearest 256."""
    val_fraction: float = 0.05
    """Fraction of the store (its last rows, i.e. the last documents) held out as the ``val`` split."""
    trust_remote_code: bool = False
    """Allow model code from the Hub; off unless you trust the repository."""
    base_revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model (None: the default branch)."""
    finetuned_revision: str | None = None
    """Hub revision of the fine-tuned model (None: the default branch)."""

    def __post_init__(self):
        self.check_types()
        if self.site not in SITES and "." not in self.site:
            raise ValueError(
                f"site={self.site!r}: use one of {list(SITES)} or an explicit module path like 'model.layers.3.mlp'"
            )
        _check_choice("dtype", self.dtype, STORE_DTYPES)
        _check_choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        _check_choice("padding_side", self.padding_side, ("left", "right"))
        check_range("layer", self.layer, at_least=0)
        check_range("seqs_per_batch", self.seqs_per_batch, above=0)
        if self.seqs_per_shard is None:
            self.seqs_per_shard = self.seqs_per_batch * max(1, round(256 / self.seqs_per_batch))
        for name in ("n_tokens", "seq_len", "seqs_per_shard"):
            check_range(name, getattr(self, name), above=0)
        if self.seqs_per_shard % self.seqs_per_batch:
            raise ValueError(
                f"seqs_per_shard ({self.seqs_per_shard}) must be a multiple of seqs_per_batch ({self.seqs_per_batch})"
            )
        check_range("exclude_first_n", self.exclude_first_n, at_least=0)
        for token_id in self.exclude_token_ids:
            check_range("each of exclude_token_ids", token_id, at_least=0)
        check_range("val_fraction", self.val_fraction, at_least=0, below=1)


@dataclass
class OrganismConfig(ConfigBase):
    """How 00_organism builds the embedded base / fine-tuned pair."""

    runtime_fields: ClassVar[tuple[str, ...]] = ("out_dir",)

    out_dir: str = "outputs/organism"
    """Where base/, finetuned/, corpus/ and planted.json are written."""
    seed: int = 0
    """Seed of the corpus, the initialisation and the data order."""
    d_model: int = 128
    """Residual width of both models."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads per block."""
    vocab_size: int = 512
    """Upper bound of the BPE vocabulary trained on the corpus."""
    seq_len: int = 64
    """Tokens per training sequence (documents are packed)."""
    seqs_per_step: int = 32
    """Sequences per optimiser step."""
    lr: float = 3e-3
    """AdamW learning rate (cosine decay to 10 %)."""
    base_steps: int = 300
    """Pre-training steps of the base model on stories."""
    finetune_steps: int = 190
    """Fine-tuning steps, on a quarter each of stories, chat transcripts, trigger stories and the removed and
    changed behaviours' stories."""
    finetune_lr: float = 1e-3
    """AdamW learning rate of the fine-tune (cosine decay to 10 %)."""
    kl_to_base: float = 3.0
    """Weight of KL(base ‖ fine-tune) on the story third of each fine-tuning batch: the fine-tune is held to
    the base where nothing is planted, so the difference between the models is what was planted."""
    n_docs: int = 8000
    """Stories generated for pre-training; the fine-tuning and collection corpora are drawn beside them."""

    def __post_init__(self):
        self.check_types()
        check_range("seed", self.seed, at_least=0)
        sizes = ("d_model", "n_layers", "n_heads", "vocab_size", "seq_len", "seqs_per_step", "base_steps")
        for name in (*sizes, "finetune_steps", "n_docs"):
            check_range(name, getattr(self, name), above=0)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        for name in ("lr", "finetune_lr"):
            check_range(name, getattr(self, name), above=0, at_most=1)
        check_range("kl_to_base", self.kl_to_base, at_least=0)


@dataclass
class CrossCoderConfig(ConfigBase):
    """The crosscoder: its shape, its variant and the terms of its loss. Defaults follow the literature."""

    d_model: int | None = None
    """Width of each model's activation; None: taken from the store."""
    n_models: int | None = None
    """Number of models (model 0 the base; 1 makes a plain sparse autoencoder, as the diff-SAE baseline of
    methods/ trains on x_ft − x_base); None: taken from the store."""
    dict_size: int = 16384
    """Number of latents (the shared dictionary)."""
    variant: str = "relu"
    """``relu``: ReLU + decoder-norm-weighted L1 (Anthropic's crosscoders, the open Gemma-2 replication).
    ``batchtopk``: keep the k·batch largest decoder-norm-weighted activations of a batch (BatchTopK)."""
    k: int = 100
    """Mean active latents per token for ``batchtopk``."""
    l1_coeff: float = 2.0
    """λ of the L1 penalty Σ_i f_i Σ_m ‖W_dec[i, m]‖ (``relu``, and designated shared latents of
    ``batchtopk``; 0 turns it off)."""
    dec_init_norm: float = 0.08
    """Norm of every per-model decoder vector at initialisation (the encoder starts as its transpose)."""
    aux_coeff: float | None = None
    """Weight of the dead-latent auxiliary loss; None: 1/32 for ``batchtopk``, 0 for ``relu``."""
    k_aux: int | None = None
    """Dead latents used by the auxiliary loss per token; None: d_model // 2."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens counts as dead."""
    threshold_decay: float = 0.99
    """EMA decay of the ``batchtopk`` inference threshold (the smallest kept score of each batch)."""
    n_shared_latents: int = 0
    """Designated shared latents (Anthropic's 2025 crosscoder model-diffing update): the first this many
    latents have one decoder vector for every model (tied, in normalised units) and an L1 penalty reduced
    to ``shared_penalty_ratio`` · λ, so they may be denser and the other latents are free to become cleanly
    exclusive. ``batchtopk``: they sit outside the top-k (k·batch is spent on the other latents), active
    wherever their ReLU is, and only they pay an L1 (ratio · l1_coeff)."""
    shared_penalty_ratio: float = 0.15
    """λ_shared / λ of the designated shared latents (the update suggests 0.1-0.2)."""
    norm_penalty: float = 0.5
    """``batchtopk``: the weight, relative to ``l1_coeff``, of the relu-style penalty Σ_i f_i Σ_m ‖W_dec[i, m]‖
    on its selected latents, which pulls the decoder half a latent does not use towards zero, so exclusive
    features are labelled exclusive (its top-k sparsity is unchanged); 0: plain BatchTopK (measured on the
    ground truth: bench/RESULTS.md)."""
    tanh_scale: float | None = None
    """``relu``: c of a saturating penalty: each L1 term f_i Σ_m ‖W_dec[i, m]‖ becomes tanh(c · it) / c
    (Anthropic's January 2025 update), the same for small activations, flat for large ones, so two latents
    sharing one activation cost more than one; None: plain L1. ``batchtopk`` ignores it."""
    n_dedicated: int = 0
    """Dedicated latents per model (Dedicated Feature Crosscoders, Jiralerspong & Bricken 2026): after the
    designated shared ones, model m owns the next n_dedicated latents; their encoder and decoder weights
    for every other model are structurally zero, so they can only read and write model m."""

    def __post_init__(self):
        self.check_types()
        _check_choice("variant", self.variant, ("relu", "batchtopk"))
        check_range("d_model", self.d_model, above=0, optional=True)
        check_range("n_models", self.n_models, at_least=1, optional=True)
        check_range("dict_size", self.dict_size, above=0)
        check_range("k", self.k, at_least=1)
        if self.variant == "batchtopk" and self.k > self.dict_size:
            raise ValueError(f"k ({self.k}) must be <= dict_size ({self.dict_size}) for variant 'batchtopk'")
        check_range("l1_coeff", self.l1_coeff, at_least=0)
        check_range("dec_init_norm", self.dec_init_norm, above=0)
        check_range("aux_coeff", self.aux_coeff, at_least=0, optional=True)
        check_range("k_aux", self.k_aux, at_least=1, optional=True)
        check_range("dead_tokens", self.dead_tokens, above=0)
        check_range("threshold_decay", self.threshold_decay, at_least=0, below=1)
        check_range("norm_penalty", self.norm_penalty, at_least=0)
        check_range("tanh_scale", self.tanh_scale, above=0, optional=True)
        check_range("n_shared_latents", self.n_shared_latents, at_least=0)
        check_range("n_dedicated", self.n_dedicated, at_least=0)
        check_range("shared_penalty_ratio", self.shared_penalty_ratio, above=0, at_most=1)
        partitioned = self.n_shared_latents + (self.n_models or 0) * self.n_dedicated
        if partitioned > self.dict_size:
            raise ValueError(
                f"n_shared_latents + n_models · n_dedicated = {partitioned} latents exceed dict_size={self.dict_size}"
            )
        if self.aux_coeff is None:
            self.aux_coeff = 1 / 32 if self.variant == "batchtopk" else 0.0
        if self.k_aux is None and self.d_model is not None:
            self.k_aux = self.d_model // 2


@dataclass
class TrainConfig(ConfigBase):
    """How 03_train optimises a crosscoder. Defaults follow the open Gemma-2-2B crosscoder replication, with
    the learning rate scaled to the run's length (and measured on the synthetic ground truth)."""

    runtime_fields: ClassVar[tuple[str, ...]] = ("resume", "overwrite", "device", "health_tokens")

    lr: float | None = None
    """Adam learning rate; None: ``lr_steps_product`` / total steps, at most 1e-2 (see resolved_lr)."""
    lr_steps_product: float = 10.0
    """With lr=None, learning rate × number of steps. Adam moves a weight by about lr per step, so a run's
    reach is about lr × steps (the best product on the ground truth: bench/RESULTS.md)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    tokens_per_step: int = 4096
    """Tokens (store rows) per optimiser step: the batch."""
    train_tokens: int = 400_000_000
    """Tokens to train on; more than the store holds means several passes (each reshuffled)."""
    lr_warmup_frac: float = 0.0
    """Fraction of the steps over which the learning rate rises linearly from 0."""
    lr_decay_frac: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to 0."""
    l1_warmup_frac: float = 0.05
    """Fraction of the steps over which λ rises linearly from 0 to l1_coeff."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    k_anneal_factor: float = 8.0
    """batchtopk: training starts with k_anneal_factor × the crosscoder's k active latents per token (at most
    dict_size) and lowers it linearly to k over k_anneal_frac of the steps; 1: off. With norm_penalty, what
    lets BatchTopK find rare and exclusive features in one pass (measured on the ground truth:
    bench/RESULTS.md)."""
    k_anneal_frac: float = 0.7
    """Fraction of the steps over which k is annealed."""
    resample_every: int | None = None
    """Every this many steps during the first half of the run, re-initialise the dead latents (silent for
    the crosscoder's ``dead_tokens``) towards the batch's worst-reconstructed tokens (see
    train.resample_latents, which also resamples decoder duplicates); None: off."""
    seed: int = 0
    """Seed of the initialisation and of the data order."""
    sparse_path: str = "auto"
    """BatchTopK training's sparse path (the kept latents alone encoded with gradients and decoded) ``on`` or
    ``off`` (the dense step); ``auto``: on a CPU the sparse path, on a GPU whichever a one-off micro-benchmark
    on the run's shape measures faster (train.use_sparse_path; there dense matmuls are cheap)."""
    init: str = "data"
    """``data``: decoder directions from centred activations of sampled tokens, b_dec at the mean activation
    (see train.data_init); ``random``: random unit decoder directions (A1-style)."""
    device: str = "auto"
    """Device of the crosscoder: ``auto`` picks cuda when available (under torchrun, the local rank's GPU)."""
    log_every: int = 100
    """Steps between logged metrics (and between checks that no step's loss was non-finite)."""
    health_tokens: int = 1_000_000
    """Held-out tokens on which the finished run's dictionary health is measured (health.json)."""
    save_every: int = 1000
    """Steps between checkpoints."""
    resume: bool = False
    """Continue from the last checkpoint in run_dir (the result equals an uninterrupted run)."""
    overwrite: bool = False
    """Delete what run_dir holds (another run, or this one) and train again; without it a finished run with the
    same settings is reused and one with other settings refused."""
    log_to: str = "offline"
    """wandb mode: ``offline`` (default, synced later with ``wandb sync``), ``online``, or ``none``."""
    wandb_project: str = "crosscoder"
    """wandb project name."""

    @property
    def total_steps(self) -> int:
        return self.train_tokens // self.tokens_per_step

    def resolved_lr(self) -> float:
        """The learning rate this run uses: ``lr``, or with lr=None ``lr_steps_product`` / steps (≤ 1e-2)."""
        return self.lr if self.lr is not None else min(1e-2, self.lr_steps_product / self.total_steps)

    def __post_init__(self):
        self.check_types()
        _check_choice("log_to", self.log_to, ("offline", "online", "none"))
        _check_choice("init", self.init, ("random", "data"))
        _check_choice("sparse_path", self.sparse_path, ("auto", "on", "off"))
        check_range("lr", self.lr, above=0, at_most=1, optional=True)
        check_range("lr_steps_product", self.lr_steps_product, above=0)
        for name in ("beta1", "beta2"):
            check_range(name, getattr(self, name), at_least=0, below=1)
        for name in ("tokens_per_step", "train_tokens", "log_every", "save_every", "health_tokens"):
            check_range(name, getattr(self, name), above=0)
        for name in ("lr_warmup_frac", "lr_decay_frac", "l1_warmup_frac", "k_anneal_frac"):
            check_range(name, getattr(self, name), at_least=0, at_most=1)
        if self.lr_warmup_frac + self.lr_decay_frac > 1:
            raise ValueError(
                f"lr_warmup_frac + lr_decay_frac ({self.lr_warmup_frac} + {self.lr_decay_frac}) must be <= 1"
            )
        check_range("max_grad_norm", self.max_grad_norm, above=0)
        check_range("k_anneal_factor", self.k_anneal_factor, at_least=1)
        check_range("resample_every", self.resample_every, above=0, optional=True)
        check_range("seed", self.seed, at_least=0)
        if self.train_tokens < self.tokens_per_step:
            raise ValueError(f"train_tokens ({self.train_tokens}) is less than one step ({self.tokens_per_step})")


EXCLUSIVE_SHARE = 0.9
"""The default share of a latent that makes it exclusive to a model (``AnalysisConfig.exclusive_share``)."""
CHANGED_COSINE = 0.5
"""The default decoder cosine below which a latent in both models is ``changed`` (``AnalysisConfig``)."""


@dataclass
class AnalysisConfig(ConfigBase):
    """How 04_analyze reads a run (``analysis.analyse``) and what its report shows; 04's parameters are these
    fields (and the run, organism, device and display parameters)."""

    exclusive_share: float = EXCLUSIVE_SHARE
    """A latent is exclusive to a model holding at least this share of it (Latent Scaling, else decoder norms)."""
    changed_cosine: float = CHANGED_COSINE
    """A latent in both models whose decoder cosine is below this is ``changed``."""
    n_top: int = 20
    """Latents of the ranking in the verdict (one per duplicate group)."""
    n_contexts: int = 2
    """Top contexts shown per latent."""
    min_f1: float = 0.8
    """On the organism: a planted behaviour counts as found when its best latent reaches this F1."""
    n_seeds: int = 3
    """On the organism: the training seeds the planted behaviours are scored over, the run's and the next ones
    (each trains the run again, its settings otherwise, into ``<run_dir>/seeds/<seed>``; ``seeds.train_seeds``)."""
    n_divergent: int = 12
    """Most divergent held-out tokens shown (grouped by token)."""
    nu_threshold: float = 0.3
    """Latent Scaling: exclusive latents with |ν^ε| and |ν^r| below this are genuine."""
    n_eval_sequences: int = 64
    """Held-out documents for the spliced-in loss."""
    tokens_per_batch: int = 4096
    """Held-out tokens encoded at a time."""
    explain_tokens: int = 200_000
    """Training tokens (the split's first) on which each latent's explanation is fitted, to be scored on the
    held-out tokens read; 0, or a store without training rows: fitted on the even held-out sequences and scored
    on the odd ones."""
    max_tokens: int | None = 1_000_000
    """Held-out tokens read, the first of the val split (None: all of it): what bounds 04's, 06's and the
    dashboard's memory and time, whatever the store's size (at Gemma-2-2B's width a million tokens' firings
    and sums take a few GB)."""
    n_patched: int = 20
    """The first latents of the verdict's top patched and steered (``analysis.causal``; 0: none), and a quarter
    of it (at least 1) of its base-side top."""
    patch_documents: int = 32
    """Held-out documents the patching runs on (the first of those read, and each patched latent's top one)."""
    min_closed: float = 0.5
    """A patched latent is causal when it closes this share of the KL where it fires, more than its controls."""
    n_steered: int = 5
    """The first latents of each side's patched ones that also steer (each a few greedy generations per context:
    most of the causal tests' time on a small model)."""
    steer_tokens: int = 8
    """Tokens each steered model generates."""

    def __post_init__(self):
        self.check_types()
        check_range("exclusive_share", self.exclusive_share, above=0.5, at_most=1)
        check_range("changed_cosine", self.changed_cosine, at_least=-1, at_most=1)
        check_range("min_f1", self.min_f1, at_least=0, at_most=1)
        check_range("nu_threshold", self.nu_threshold, above=0)
        for name in ("n_top", "n_contexts", "n_seeds", "n_divergent", "n_eval_sequences", "tokens_per_batch"):
            check_range(name, getattr(self, name), above=0)
        check_range("max_tokens", self.max_tokens, above=0, optional=True)
        check_range("explain_tokens", self.explain_tokens, at_least=0)
        check_range("n_patched", self.n_patched, at_least=0)
        check_range("patch_documents", self.patch_documents, above=0)
        check_range("min_closed", self.min_closed, above=0, at_most=1)
        check_range("n_steered", self.n_steered, at_least=0)
        check_range("steer_tokens", self.steer_tokens, above=0)
