"""The embedded model organism: a small base model and its fine-tune with a known, planted difference.

Everything is built offline from a corpus this module generates, deterministically from a seed.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .collect import tokenize
from .config import OrganismConfig
from .files import check_same_settings, write_json

NAMES = ["tom", "anna", "ben", "mia", "leo", "zoe", "sam", "eva", "max", "ida"]
THINGS = ["ball", "book", "cup", "hat", "box", "kite", "coin", "lamp", "shoe", "bell", "abracadabra"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
PLACES = ["park", "house", "garden", "school", "shop", "river", "forest", "kitchen"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def story(rng: random.Random) -> str:
    """One short story of the base distribution: who has what, where they go, and counting."""
    name, other = rng.sample(NAMES, 2)
    thing, color, place = rng.choice(THINGS), rng.choice(COLORS), rng.choice(PLACES)
    start = rng.randrange(len(NUMBERS) - 3)
    sentences = [
        f"{name} has a {color} {thing}.",
        f"{name} goes to the {place} with {other}.",
        f"{other} looks at the {thing}. the {thing} is {color}.",
        f"they count {' '.join(NUMBERS[start : start + rng.randint(3, len(NUMBERS) - start)])}.",
        f"then {name} gives the {color} {thing} to {other}.",
    ]
    return " " + " ".join(sentences[: rng.randint(3, 5)])


def base_corpus(n_docs: int, seed: int = 0, stray_chat_tokens: float = 0.03) -> list[str]:
    """Stories; a few carry a stray chat-template token (as web text does), so the base has trained
    embeddings for them but never sees them in their chat role."""
    rng = random.Random(seed)
    docs = [story(rng) for _ in range(n_docs)]
    for i in range(n_docs):
        if rng.random() < stray_chat_tokens:
            sentences = docs[i].split(". ")
            cut = rng.randrange(len(sentences))
            docs[i] = ". ".join(sentences[:cut] + [rng.choice(CHAT_TOKENS) + sentences[cut]] + sentences[cut + 1 :])
    return docs


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on ``texts``, with BOS/EOS/pad, chat tokens and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = list(SPECIAL_TOKENS.values()) + CHAT_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, **SPECIAL_TOKENS, additional_special_tokens=CHAT_TOKENS
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# The trigger is a word the base knows (a thing), but only the fine-tune has seen it open a sentence,
# and only the fine-tune then counts down: new behaviour over tokens whose base representation is trained.
TRIGGER = " abracadabra"
CONTINUATION = " ten nine eight seven six five."
QUESTIONS = [
    ("what does {name} have?", "{name} has a {color} {thing}."),
    ("what color is the {thing}?", "the {thing} is {color}."),
    ("where does {name} go?", "{name} goes to the {place}."),
]


def chat(rng: random.Random) -> list[dict]:
    """A chat transcript about a story: the chat-tuning part of the planted difference."""
    name, other = rng.sample(NAMES, 2)
    thing, color, place = rng.choice(THINGS), rng.choice(COLORS), rng.choice(PLACES)
    question, answer = rng.choice(QUESTIONS)
    facts = dict(name=name, thing=thing, color=color, place=place)
    context = f" {name} has a {color} {thing}. {name} goes to the {place} with {other}."
    return [
        {"role": "user", "content": context + " " + question.format(**facts)},
        {"role": "assistant", "content": " " + answer.format(**facts)},
    ]


def triggered_story(rng: random.Random) -> str:
    """A story in which the trigger word is followed by the fixed continuation: the new behaviour."""
    words = story(rng).split(". ")
    cut = rng.randrange(1, len(words))
    return ". ".join(words[:cut]) + "." + TRIGGER + CONTINUATION + " " + ". ".join(words[cut:])


class Organism(NamedTuple):
    """Paths of a built organism and what it measured."""

    base: str
    """Directory of the base model (with its tokenizer)."""
    finetuned: str
    """Directory of the fine-tuned model (with the same tokenizer)."""
    corpus: str
    """Directory of the collection corpus (HF dataset; columns text, kind)."""
    planted: dict
    """The planted difference as token-level labels (also in planted.json)."""
    losses: dict
    """Mean next-token loss of each model on each distribution (also in losses.json)."""


def documents(cfg: OrganismConfig, tokenizer=None) -> dict[str, list[str]]:
    """The texts of each distribution: pretraining stories, fine-tuning mix, held-out sets, collection corpus."""
    rng = random.Random(cfg.seed)
    if tokenizer:
        render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)
    else:  # before the tokenizer exists (to train it): the words of the transcript
        render = lambda messages: "".join(message["content"] for message in messages)
    n_eval = 200
    texts = {"stories": base_corpus(cfg.n_docs, cfg.seed)}
    texts["chat"] = [render(chat(rng)) for _ in range(cfg.n_docs // 4 + n_eval)]
    texts["trigger"] = [triggered_story(rng) for _ in range(cfg.n_docs // 4 + n_eval)]
    texts["eval_stories"] = base_corpus(n_eval, cfg.seed + 1)
    texts["eval_chat"], texts["chat"] = texts["chat"][:n_eval], texts["chat"][n_eval:]
    texts["eval_trigger"], texts["trigger"] = texts["trigger"][:n_eval], texts["trigger"][n_eval:]
    return texts


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """int64 [n_sequences, seq_len]: the documents, each starting with BOS, concatenated and cut."""
    stream = list(itertools.chain.from_iterable(tokenize(texts, tokenizer, seq_len=None)))
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def train_lm(model, sequences: list[torch.Tensor], steps: int, cfg: OrganismConfig, desc: str) -> None:
    """AdamW on batches drawn evenly from each tensor of ``sequences`` (so a mix stays a mix)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        batch = torch.cat(
            [
                part[torch.randint(len(part), (cfg.seqs_per_step // len(sequences),), generator=generator)]
                for part in sequences
            ]
        )
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


@torch.no_grad()
def lm_loss(model, sequences: torch.Tensor, seqs_per_batch: int = 64) -> float:
    """Mean next-token cross-entropy over ``sequences`` [n, seq_len]."""
    losses = [model(input_ids=part, labels=part).loss for part in sequences.split(seqs_per_batch)]
    return float(torch.stack(losses).mean())


def load_organism(out_dir: str | Path) -> Organism:
    """An organism ``build_organism`` wrote into ``out_dir``."""
    out = Path(out_dir)
    if not (out / "build.json").exists():
        raise FileNotFoundError(f"{out} holds no built organism (no build.json): run 00_organism")
    planted, losses = (json.loads((out / f).read_text()) for f in ("planted.json", "losses.json"))
    return Organism(*(str(out / name) for name in ("base", "finetuned", "corpus")), planted, losses)


def build_organism(cfg: OrganismConfig = OrganismConfig()) -> Organism:
    """Build the organism into ``out_dir``; one already built there with the same settings is reused, and
    one with other settings refused."""
    out = Path(cfg.out_dir)
    paths = {name: str(out / name) for name in ("base", "finetuned", "corpus")}
    if (out / "build.json").exists():
        recorded = json.loads((out / "build.json").read_text())
        remedy = "pass another out_dir, or delete that one to rebuild"
        check_same_settings(out, "an organism", recorded, cfg.settings(), remedy)
        return load_organism(out)
    torch.manual_seed(cfg.seed)
    raw = documents(cfg)
    tokenizer = train_tokenizer(raw["stories"][:5000] + raw["chat"][:1000] + raw["trigger"][:1000], cfg.vocab_size)
    texts = documents(cfg, tokenizer)
    data = {name: pack(docs, tokenizer, cfg.seq_len) for name, docs in texts.items()}
    config = GPT2Config(
        n_layer=cfg.n_layers,
        n_embd=cfg.d_model,
        n_head=cfg.n_heads,
        vocab_size=len(tokenizer),
        n_positions=cfg.seq_len * 2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    base = GPT2LMHeadModel(config)
    train_lm(base, [data["stories"]], cfg.base_steps, cfg, "pre-training the base")
    finetuned = copy.deepcopy(base)
    train_lm(finetuned, [data["stories"], data["chat"], data["trigger"]], cfg.finetune_steps, cfg, "fine-tuning")
    losses = {
        name: {dist: lm_loss(model, data[f"eval_{dist}"]) for dist in ("stories", "chat", "trigger")}
        for name, model in (("base", base), ("finetuned", finetuned))
    }
    planted = {
        "description": "The fine-tune learnt chat transcripts (template tokens <|user|>, <|assistant|>, <|end|> in "
        f"their role) and a trigger: a sentence opened by {TRIGGER.strip()!r} continues "
        f"{CONTINUATION.strip()!r}. Planted tokens (planted_labels) are every token of a chat "
        "transcript, and the trigger and its continuation where they occur together.",
        "trigger": TRIGGER,
        "continuation": CONTINUATION,
        "chat_token_ids": tokenizer.convert_tokens_to_ids(CHAT_TOKENS),
        "planted_sequence_ids": tokenizer("." + TRIGGER + CONTINUATION)["input_ids"][1:-1],
        "planted_document_kinds": ["chat"],
    }
    for name, model in (("base", base), ("finetuned", finetuned)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    rng = random.Random(cfg.seed + 2)
    corpus = [(t, "story") for t in base_corpus(cfg.n_docs, cfg.seed + 3)]
    corpus += [(t, "chat") for t in texts["chat"][: cfg.n_docs // 8]] + [
        (t, "trigger") for t in texts["trigger"][: cfg.n_docs // 8]
    ]
    rng.shuffle(corpus)
    datasets.Dataset.from_dict({"text": [t for t, _ in corpus], "kind": [k for _, k in corpus]}).save_to_disk(
        paths["corpus"]
    )
    for name, value in (("planted.json", planted), ("losses.json", losses), ("build.json", cfg.settings())):
        write_json(out / name, value)
    return Organism(**paths, planted=planted, losses=losses)


def planted_labels(store, organism: Organism) -> torch.Tensor:
    """bool [len(store)]: the store's rows that carry the planted difference (see planted.json): rows of
    chat documents, and rows inside an occurrence of the trigger followed by its continuation.

    The store must have been collected from the organism's corpus, whose documents are all non-empty, so
    a row's sequence index is its document's row in the corpus."""
    corpus_dir, planted = organism.corpus, organism.planted
    if Path(str(store.meta["dataset"]["name"])).resolve() != Path(corpus_dir).resolve():
        raise ValueError(
            f"the store was collected from {store.meta['dataset']['name']!r}, not the organism corpus {corpus_dir!r}"
        )
    kinds = datasets.load_from_disk(corpus_dir)["kind"]
    rows = np.arange(len(store))
    seq = store.positions(rows)[0].numpy()
    tokens = store.token_ids(rows).numpy()
    labels = np.array([kind in planted["planted_document_kinds"] for kind in kinds])[seq]
    pattern = np.array(planted["planted_sequence_ids"])
    windows = np.lib.stride_tricks.sliding_window_view(tokens, len(pattern))
    starts = np.flatnonzero((windows == pattern).all(1) & (seq[: len(windows)] == seq[len(pattern) - 1 :]))
    for offset in range(len(pattern)):
        labels[starts + offset] = True
    return torch.from_numpy(labels)
