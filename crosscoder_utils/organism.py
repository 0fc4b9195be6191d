"""The embedded model organism: a small base model and its fine-tune with a known, planted difference.

Everything is built offline from a corpus this module generates, deterministically from a seed.
"""
from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

NAMES = ["tom", "anna", "ben", "mia", "leo", "zoe", "sam", "eva", "max", "ida"]
THINGS = ["ball", "book", "cup", "hat", "box", "kite", "coin", "lamp", "shoe", "bell"]
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
        f"they count {' '.join(NUMBERS[start:start + rng.randint(3, len(NUMBERS) - start)])}.",
        f"then {name} gives the {color} {thing} to {other}.",
    ]
    return " " + " ".join(sentences[: rng.randint(3, 5)])


def base_corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [story(rng) for _ in range(n_docs)]


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on ``texts``, with BOS/EOS/pad, chat tokens and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = list(SPECIAL_TOKENS.values()) + CHAT_TOKENS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS,
                                      additional_special_tokens=CHAT_TOKENS)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
