"""Loading a base / fine-tuned model pair and resolving an activation *site* inside it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import MODEL_DTYPES, SITES

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 1234 <|user|> Hello!\n"
PROBE_TEXTS = (
    PROBE_TEXT,
    "Straße, café, NAÏVE Ångström: ﬁne ½ ①",
    "  two  spaces,\ttab\n\nnewlines  ",
    "def f(x):\n    return x ** 2  # 3.14159, 1e-9, 100000",
    "emoji 🙂, 漢字, Привет",
    "<s> </s> <bos> <eos> <pad> <unk> <|endoftext|> <|im_start|>",
)
"""Texts whose token ids show how two tokenizers differ: case, accents and compatibility characters
(normalizers), whitespace, code and numbers (pre-tokenizers, merges), other scripts, special-token strings."""
SPECIAL_TOKEN_IDS = ("bos_token_id",)
"""The special-token roles that must agree: BOS opens every collected document. A chat fine-tune often
declares another EOS or pad token (Llama-3 and Qwen2.5 base vs instruct), which changes neither how text is
split nor the ids both models read (a batch is padded the base's way, behind the attention mask)."""

# Where the blocks live, and the attention / MLP submodule whose output is added to the residual stream.
# Gemma-2 and Gemma-3 normalise both branches again after them, so their branch outputs are those norms' outputs.
ARCHITECTURES = {
    "gpt2": ("transformer.h", "attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
    "llama": ("model.layers", "self_attn", "mlp"),
    "mistral": ("model.layers", "self_attn", "mlp"),
    "qwen2": ("model.layers", "self_attn", "mlp"),
    "gemma": ("model.layers", "self_attn", "mlp"),
    "gemma2": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
}


# The final norm before the unembedding; Gemma's RMSNorm multiplies by (1 + weight).
FINAL_NORMS = {
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
    "llama": "model.norm",
    "mistral": "model.norm",
    "qwen2": "model.norm",
    "gemma": "model.norm",
    "gemma2": "model.norm",
    "gemma3_text": "model.norm",
}


def direct_logit_effect(model: PreTrainedModel, directions: torch.Tensor) -> torch.Tensor:
    """[n, vocab]: what each direction [n, d_model] written into the residual stream adds to the logits,
    through the final norm's scale and the unembedding (the norm's centring and division by the stream's
    norm left out, as in direct logit attribution)."""
    kind = model.config.model_type
    if kind not in FINAL_NORMS:
        raise ValueError(f"no known final norm for model_type {kind!r} (known: {sorted(FINAL_NORMS)})")
    scale = model.get_submodule(FINAL_NORMS[kind]).weight.float()
    scale = 1 + scale if kind.startswith("gemma") else scale
    unembedding = model.get_output_embeddings().weight.float()
    return (directions.float().to(scale.device) * scale) @ unembedding.T


class TopLogits(NamedTuple):
    """Per direction, the tokens whose logits it raises and lowers most (``top_logit_effects``)."""

    promoted: torch.return_types.topk
    """values and indices [n, k] of the largest logit effects."""
    suppressed: torch.return_types.topk
    """values and indices [n, k] of the most negative effects (values negated: largest first)."""


def top_logit_effects(model: PreTrainedModel, directions: torch.Tensor, k: int, chunk: int = 256) -> TopLogits:
    """``direct_logit_effect`` of ``directions`` [n, d_model], keeping each one's top ``k`` promoted and suppressed
    tokens, ``chunk`` directions at a time: the full [n, vocab] matrix of a 16k-latent dictionary at a 256k
    vocabulary would take 17 GB, a chunk takes 256 MB."""
    parts = []
    for start in range(0, len(directions), chunk):
        effect = direct_logit_effect(model, directions[start : start + chunk].to(model.device)).cpu()
        parts.append((effect.topk(k, dim=1), (-effect).topk(k, dim=1)))
    join = lambda side: torch.return_types.topk([torch.cat([p[side][i] for p in parts]) for i in range(2)])
    return TopLogits(join(0), join(1))


class ModelPair(NamedTuple):
    """Two causal LMs that share one tokenizer."""

    base: PreTrainedModel
    """Model 0: the base model."""
    finetuned: PreTrainedModel
    """Model 1: the fine-tuned model."""
    tokenizer: PreTrainedTokenizerBase
    """The tokenizer both models share."""
    names: tuple[str, str]
    """The names or paths they were loaded from."""

    @property
    def models(self) -> list[PreTrainedModel]:
        """[base, finetuned], in store order."""
        return [self.base, self.finetuned]


class Site(NamedTuple):
    """A place in a model whose activation we read."""

    module_path: str
    """Dotted path of the module, e.g. ``transformer.h.3``."""
    read_input: bool
    """Read the module's input (``resid_pre``) rather than its output."""


def local_or_hub(name: str | Path, repo_type: str = "model") -> str | Path:
    """Where ``name`` is read from: a local Path, or the name itself as a Hub id.

    A Path, a name that exists on disk, or one that looks like a path (starts with ``.``, ``/`` or ``~``, or
    holds more than one ``/``) is local, and a missing one raises FileNotFoundError here: sent to the Hub it
    would cost retries and end in an error about an invalid repository id. Only ``owner/name`` or a bare
    ``name`` that is not on disk is a Hub id, and when the Hub cannot be reached (``hub_unreachable``) only one
    in the local Hub cache (of ``repo_type``) is: any other is refused at once, naming it."""
    path = Path(name).expanduser()
    if path.is_file() and repo_type == "model":
        raise NotADirectoryError(f"{path} is a file, not a model directory: give the folder that holds config.json")
    if path.exists():
        return path
    text = str(name)
    if isinstance(name, Path) or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"no such directory: {text}")
    if "/" in text and Path(text.split("/")[0]).is_dir():  # owner/name whose owner is a local folder: a typo
        raise FileNotFoundError(
            f"no such directory: {text} (its folder {text.split('/')[0]}/ is here; not sent to the Hub)"
        )
    why = hub_unreachable()
    if why and not in_hub_cache(text, repo_type):
        raise FileNotFoundError(
            f"{text} is neither a local directory (there is none at {path.resolve()}) nor a Hub {repo_type} this "
            f"machine can reach ({why}), and the Hub cache does not hold it: give the directory's path, or reach "
            "the Hub"
        )
    return text


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached from this process (offline mode, or no answer from its endpoint within 5 s),
    or None; asked once per process."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as error:  # whatever the HTTP client raises: a name, a connection or a timeout failure
        return f"{constants.ENDPOINT} does not answer: {error}"
    return None


def in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """Whether the local Hub cache holds a snapshot of ``repo_id`` (what an offline load would read)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):
        return False
    return True


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_model_pair(
    base_model: str,
    finetuned_model: str,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    base_revision: str | None = None,
    finetuned_revision: str | None = None,
) -> ModelPair:
    """Load two causal LMs (Hub ids or local directories, see ``local_or_hub``), each at its own Hub revision,
    and refuse a pair whose tokenizers differ."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(MODEL_DTYPES)}")
    sources = [local_or_hub(name) for name in (base_model, finetuned_model)]  # a missing path fails here, at once
    revisions = (base_revision, finetuned_revision)
    tokenizers = [
        AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        for source, revision in zip(sources, revisions)
    ]
    check_same_tokenizer(*tokenizers, names=(base_model, finetuned_model))
    models = [
        AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, dtype), revision=revision, trust_remote_code=trust_remote_code
        )
        .to(resolve_device(device))
        .eval()
        for source, revision in zip(sources, revisions)
    ]
    for model in models:
        model.requires_grad_(False)
    return ModelPair(models[0], models[1], tokenizers[0], (base_model, finetuned_model))


def tokenizer_parts(tokenizer: PreTrainedTokenizerBase, serialised: bool) -> dict[str, object]:
    """What decides how ``tokenizer`` turns text into ids and back, by part.

    ``serialised`` (fast tokenizers): every part of the serialisation (added_tokens, normalizer, pre_tokenizer,
    post_processor, decoder, the model's vocab, merges and settings as ``model <setting>``), except truncation
    and padding, which calls switch on and off. Otherwise what every tokenizer has: the vocabulary, the added
    tokens and, for a BPE tokenizer, its merges. Both with the ids of ``SPECIAL_TOKEN_IDS``."""
    if serialised:
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        model = state.pop("model")
        parts = {key: value for key, value in state.items() if key not in ("version", "truncation", "padding")}
        parts.update({key if key in ("vocab", "merges") else f"model {key}": value for key, value in model.items()})
    else:
        parts = {
            "vocab": tokenizer.get_vocab(),
            "added_tokens": {i: repr(token) for i, token in tokenizer.added_tokens_decoder.items()},
        }
        ranks = getattr(tokenizer, "bpe_ranks", None)
        if ranks is not None:
            parts["merges"] = sorted(ranks, key=ranks.get)
    parts.update({name: getattr(tokenizer, name) for name in SPECIAL_TOKEN_IDS})
    return parts


def _describe(part: str, first, second) -> str:
    """A differing part by name, with the values where they are short or can be summarised."""
    if part in SPECIAL_TOKEN_IDS:
        return f"{part} {first} vs {second}"
    if part == "vocab" and isinstance(first, dict) and isinstance(second, dict):
        entries = len(set(first.items()) ^ set(second.items()))
        return f"vocab ({entries} entries differ, sizes {len(first)} and {len(second)})"
    return part


def check_same_tokenizer(
    first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase, names=("base", "finetuned")
) -> None:
    """Both models must read the same token ids, or their activations at a position are not paired: refuse
    tokenizers that differ in any part both have (``tokenizer_parts``: the serialisations when both are fast)
    or that split any of ``PROBE_TEXTS`` differently. The error names each differing part and the first probe
    text split differently, from the first token where they part."""
    serialised = first.is_fast and second.is_fast
    parts = tokenizer_parts(first, serialised), tokenizer_parts(second, serialised)
    found = [
        _describe(part, parts[0][part], parts[1][part])
        for part in parts[0]
        if part in parts[1] and parts[0][part] != parts[1][part]
    ]
    for text in PROBE_TEXTS:
        ids = first(text)["input_ids"], second(text)["input_ids"]
        if ids[0] != ids[1]:
            at = next((i for i, (a, b) in enumerate(zip(*ids)) if a != b), min(map(len, ids)))
            pieces = [tokenizer.convert_ids_to_tokens(row[at : at + 4]) for tokenizer, row in zip((first, second), ids)]
            found.append(
                f"the first probe text they split differently is {text!r} (from token {at}: {pieces[0]} vs {pieces[1]})"
            )
            break
    if found:
        raise ValueError(
            f"the tokenizers of {names[0]!r} and {names[1]!r} differ: {'; '.join(found)}; "
            "a crosscoder needs both models on the same tokens"
        )


def architecture(model: PreTrainedModel) -> tuple[str, str, str]:
    kind = model.config.model_type
    if kind not in ARCHITECTURES:
        raise ValueError(
            f"no named sites for model_type {kind!r} (known: {sorted(ARCHITECTURES)}); pass an explicit module "
            f"path as site, e.g. one of {[n for n, _ in model.named_modules()][:8]}..."
        )
    return ARCHITECTURES[kind]


def resolve_site(model: PreTrainedModel, site: str, layer: int) -> Site:
    """Turn ``site`` at ``layer`` (or an explicit module path) into a module path of ``model``."""
    if site not in SITES:
        modules = dict(model.named_modules())
        if site not in modules:
            raise ValueError(f"site {site!r} is neither one of {list(SITES)} nor a module of {type(model).__name__}")
        if type(modules[site]).forward is torch.nn.Module.forward:  # a ModuleList or ModuleDict: never called
            inner = next((f"{site}.{n}" for n, _ in modules[site].named_children()), None)
            raise ValueError(
                f"site {site!r} is a {type(modules[site]).__name__} of {type(model).__name__}, a container the model "
                f"never calls: name a module inside it (such as {inner!r}) or one of {list(SITES)} with a layer"
            )
        return Site(site, read_input=False)
    blocks_path, attn, mlp = architecture(model)
    n_layers = len(model.get_submodule(blocks_path))
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"layer {layer} is out of range for {type(model).__name__}: valid layers are 0..{n_layers - 1}"
        )
    block = f"{blocks_path}.{layer}"
    return {
        "resid_pre": Site(block, read_input=True),
        "resid_post": Site(block, read_input=False),
        "attn_out": Site(f"{block}.{attn}", read_input=False),
        "mlp_out": Site(f"{block}.{mlp}", read_input=False),
    }[site]
