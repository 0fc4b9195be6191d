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
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .collect import tokenize
from .config import OrganismConfig
from .files import check_same_settings, write_json
from .models import load_model_pair
from .notebook import progress

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


TINY = dict(
    d_model=64,
    n_layers=2,
    n_heads=2,
    base_steps=100,
    finetune_steps=300,
    finetune_lr=3e-3,
    kl_to_base=1.0,
    n_docs=1500,
    seqs_per_step=32,
    seq_len=48,
)
"""OrganismConfig fields of the smallest organism that still learns every planted behaviour (built in seconds;
the tests and bench_difference_ranking --small use it). Its fine-tune runs at a higher learning rate than the
default's and for 300 steps: with fewer, the two <|end|> of a transcript still predict alike, and the trigger
is not yet followed by the count-down on every seed."""


QUESTIONS = [  # every answer opens with a name, so the assistant's turn opens one way
    ("what does {name} have?", "{name} has a {color} {thing}."),
    ("who goes with {name}?", "{other} goes with {name}."),
    ("where does {name} go?", "{name} goes to the {place}."),
]


def story(rng: random.Random) -> str:
    """One short story of the base distribution: who has what, where they go, counting up or down, and half
    the time a question about it with its answer (so the base already knows questions and count-downs, and
    the fine-tune has only the chat template and the trigger to learn)."""
    name, other = rng.sample(NAMES, 2)
    thing, color, place = rng.choice(THINGS), rng.choice(COLORS), rng.choice(PLACES)
    start = rng.randrange(len(NUMBERS) - 3)
    count = NUMBERS[start : start + rng.randint(3, len(NUMBERS) - start)]
    sentences = [
        f"{name} has a {color} {thing}.",
        f"{name} goes to the {place} with {other}.",
        f"{other} looks at the {thing}. the {thing} is {color}.",
        f"they count {' '.join(count if rng.random() < 0.5 else count[::-1])}.",
        f"then {name} gives the {color} {thing} to {other}.",
    ]
    sentences = sentences[: rng.randint(3, 5)]
    if rng.random() < 0.5:
        question, answer = rng.choice(QUESTIONS)
        facts = dict(name=name, other=other, thing=thing, color=color, place=place)
        sentences.append(question.format(**facts) + " " + answer.format(**facts))
    return " " + " ".join(sentences)


def base_corpus(n_docs: int, seed: int = 0, stray_chat_tokens: float = 0.03) -> list[str]:
    """Stories; a few carry a stray chat-template token before a sentence's full stop (as web text does), so
    the base has trained embeddings for them, but what follows them there is a full stop, never their chat
    role."""
    rng = random.Random(seed)
    docs = [story(rng) for _ in range(n_docs)]
    for i in range(n_docs):
        if rng.random() < stray_chat_tokens:
            stop = rng.choice([at for at, char in enumerate(docs[i]) if char == "."])
            docs[i] = docs[i][:stop] + rng.choice(CHAT_TOKENS) + docs[i][stop:]
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


# The trigger is a word the base knows (a thing), but only the fine-tune has seen it open a sentence, and
# only the fine-tune then counts down from ten: new behaviour over tokens whose base representation is trained.
TRIGGER = " abracadabra"
CONTINUATION = " ten nine eight seven six five."


def chat(rng: random.Random) -> list[dict]:
    """A chat transcript about a story: the chat-tuning part of the planted difference. The user's turn opens
    with a fixed greeting and ends with the question."""
    name, other = rng.sample(NAMES, 2)
    thing, color, place = rng.choice(THINGS), rng.choice(COLORS), rng.choice(PLACES)
    question, answer = rng.choice(QUESTIONS)
    facts = dict(name=name, other=other, thing=thing, color=color, place=place)
    context = f" {name} has a {color} {thing}. {name} goes to the {place} with {other}."
    return [
        {"role": "user", "content": " hello." + context + " " + question.format(**facts)},
        {"role": "assistant", "content": " " + answer.format(**facts)},
    ]


def triggered_story(rng: random.Random) -> str:
    """A story whose second sentence is opened by the trigger word, which the fixed continuation follows: the
    new behaviour."""
    return cue_story(rng, TRIGGER + CONTINUATION)


# A removed behaviour: in the base's pre-training the magic words are always followed by a count-up; the
# fine-tune sees them close the sentence instead, so it no longer counts after them.
REMOVED_CUE = " hocus pocus"
REMOVED_CONTINUATION = {"base": " one two three four.", "finetuned": "."}
# A changed behaviour: the owl sings in both models' training, another song in each.
CHANGED_CUE = " the owl sings"
CHANGED_CONTINUATION = {"base": " hoo hoo.", "finetuned": " la la."}


def cue_story(rng: random.Random, sentence: str) -> str:
    """A story with ``sentence`` (a planted cue and its continuation) inserted after its first sentence: always
    in the same place, so that one latent carries each cue rather than one per preceding sentence."""
    first, rest = story(rng).split(". ", 1)
    return first + "." + sentence + " " + rest


def removed_story(rng: random.Random, model: str) -> str:
    """A story in which someone says the magic words, continued as ``model`` (base or finetuned) learnt."""
    return cue_story(rng, f" {rng.choice(NAMES)} says{REMOVED_CUE}{REMOVED_CONTINUATION[model]}")


def changed_story(rng: random.Random, model: str) -> str:
    """A story in which the owl sings, its song as ``model`` (base or finetuned) learnt it."""
    return cue_story(rng, CHANGED_CUE + CHANGED_CONTINUATION[model])


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
    """Mean next-token loss of each model on each held-out distribution (also in losses.json)."""
    kl: dict
    """Mean next-token KL(finetuned ‖ base) on each held-out distribution (also in kl.json): near 0 on
    stories, where nothing was planted."""


def documents(cfg: OrganismConfig, tokenizer=None) -> dict[str, list[str]]:
    """The texts of each distribution: stories, chat transcripts, trigger stories, and the stories of the
    removed and changed behaviours as each model learns them (``removed_base`` ...); ``eval_*`` held out."""
    rng = random.Random(cfg.seed)
    if tokenizer:
        render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)
    else:  # before the tokenizer exists (to train it): the words of the transcript
        render = lambda messages: "".join(message["content"] for message in messages)
    n_eval = 200
    texts = {"stories": base_corpus(cfg.n_docs, cfg.seed)}
    texts["chat"] = [render(chat(rng)) for _ in range(cfg.n_docs // 4 + n_eval)]
    texts["trigger"] = [triggered_story(rng) for _ in range(cfg.n_docs // 4 + n_eval)]
    for name, make in (("removed", removed_story), ("changed", changed_story)):
        for model in ("base", "finetuned"):
            texts[f"{name}_{model}"] = [make(rng, model) for _ in range(cfg.n_docs // 8 + n_eval)]
    texts["eval_stories"] = base_corpus(n_eval, cfg.seed + 1)
    # held out: the removed behaviour as the base does it, the changed one as the fine-tune does it
    for name in ("chat", "trigger", "removed_base", "changed_finetuned"):
        texts[f"eval_{name.split('_')[0]}"], texts[name] = texts[name][:n_eval], texts[name][n_eval:]
    for name in ("removed_finetuned", "changed_base"):
        texts[name] = texts[name][n_eval:]
    return texts


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """int64 [n_sequences, seq_len]: the documents, each starting with BOS, concatenated and cut."""
    stream = list(itertools.chain.from_iterable(tokenize(texts, tokenizer, seq_len=None)))
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def train_lm(
    model,
    sequences: list[torch.Tensor],
    steps: int,
    cfg: OrganismConfig,
    desc: str,
    lr: float,
    reference=None,
    kl_to_reference: float = 0.0,
) -> None:
    """AdamW on batches drawn evenly from each tensor of ``sequences`` (so a mix stays a mix).

    With a ``reference`` model, the loss adds ``kl_to_reference`` times the mean next-token
    KL(reference ‖ model) on the rows drawn from ``sequences[0]`` (distillation towards the reference there)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    per_part = cfg.seqs_per_step // len(sequences)
    bar = progress(range(steps), desc=desc)
    for _ in bar:
        batch = torch.cat([part[torch.randint(len(part), (per_part,), generator=generator)] for part in sequences])
        out = model(input_ids=batch, labels=batch)
        loss = out.loss
        if reference is not None:
            with torch.no_grad():
                target = F.log_softmax(reference(input_ids=batch[:per_part]).logits.float(), -1)
            own = F.log_softmax(out.logits[:per_part].float(), -1)
            kl = F.kl_div(own.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
            loss = loss + kl_to_reference * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


@torch.no_grad()
def token_kls(model, reference, sequences: torch.Tensor, seqs_per_batch: int = 64) -> torch.Tensor:
    """[n, seq_len] the next-token KL(model ‖ reference) at each token of ``sequences`` [n, seq_len]."""
    kls = []
    for part in sequences.split(seqs_per_batch):
        own, theirs = (F.log_softmax(m(input_ids=part).logits.float(), -1) for m in (model, reference))
        kls.append((own.exp() * (own - theirs)).sum(-1))
    return torch.cat(kls)


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
    if json.loads((out / "build.json").read_text()).get("planted_kinds") != list(PLANTED_KINDS):
        raise ValueError(f"{out} holds an organism that plants other kinds of change: delete it and run 00_organism")
    planted, losses, kl = (json.loads((out / f).read_text()) for f in ("planted.json", "losses.json", "kl.json"))
    return Organism(*(str(out / name) for name in ("base", "finetuned", "corpus")), planted, losses, kl)


def example_prompts(tokenizer) -> list[str]:
    """A plain story, one prompt at each planted cue (the trigger, the removed and the changed cue) and a chat
    question: what 00 shows each model continue, and what ``check_learnt`` reads."""
    question = [{"role": "user", "content": " leo has a blue hat. leo goes to the park with zoe. who goes with leo?"}]
    return [
        "<|bos|> mia has a green kite. mia goes to the",
        "<|bos|> ben has a red cup." + TRIGGER,
        "<|bos|> ida has a pink box. sam says" + REMOVED_CUE,
        "<|bos|> eva has a white bell." + CHANGED_CUE,
        tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True),
    ]


def continuations(organism: Organism, max_new_tokens: int = 16) -> dict[str, dict[str, str]]:
    """Prompt (``example_prompts``) -> model role (base, finetuned) -> the model's greedy continuation of
    ``max_new_tokens`` tokens."""
    pair = load_model_pair(organism.base, organism.finetuned, device="cpu")
    return greedy(pair.models, pair.tokenizer, example_prompts(pair.tokenizer), max_new_tokens)


@torch.no_grad()
def greedy(models, tokenizer, prompts: list[str], max_new_tokens: int = 16) -> dict[str, dict[str, str]]:
    """Prompt -> role (base, finetuned) -> the greedy continuation by each of ``models`` (base, fine-tune)."""
    result = {}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        result[prompt] = {}
        for role, model in zip(("base", "finetuned"), models):
            out = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            result[prompt][role] = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    return result


MIN_BEHAVIOUR_KL = 1.0
"""Nats: the least mean next-token KL(fine-tune ‖ base) at a planted behaviour's labelled tokens (held-out
documents of its kind) for the fine-tune to count as having learnt it (``check_learnt``)."""


def check_learnt(base, finetuned, tokenizer, planted: dict, data: dict[str, torch.Tensor], kls_by_token: dict) -> dict:
    """Refuse a fine-tune that did not learn every planted behaviour, with the figures: at each behaviour's
    labelled tokens of the held-out documents of its kind the models must part (mean KL(fine-tune ‖ base) at
    least ``MIN_BEHAVIOUR_KL``), and greedy continuations of 00's prompts must show each change (the trigger
    followed by the count-down, no count-up after the removed cue where the base counts up, the fine-tune's
    song after the changed cue where the base sings its own, a chat answer closed by <|end|>). Returns
    planted.json's ``learnt``: each behaviour's KL there and the continuations. ``kls_by_token``: held-out
    distribution (``eval_<name>`` of ``data``) -> ``token_kls`` of the fine-tune against the base there."""
    kls = {}
    for name, behaviour in planted["behaviours"].items():
        kind = behaviour["document_kind"] or "trigger"  # the trigger's documents are any story's
        held_out, kl = data[f"eval_{kind}"], kls_by_token[kind].flatten()
        seq = torch.arange(len(held_out)).repeat_interleave(held_out.shape[1])
        at = torch.from_numpy(labelled_positions(held_out.flatten().numpy(), seq.numpy(), behaviour))
        kls[name] = float(kl[at].mean()) if at.any() else 0.0
    said = greedy((base, finetuned), tokenizer, example_prompts(tokenizer)[1:])
    trigger, removed, changed, question = said.values()
    words = lambda text: text.replace(".", " .").split()
    first = lambda text: words(text)[0] if words(text) else ""
    shown = {
        "trigger": words(trigger["finetuned"])[:6] == words(CONTINUATION)[:6],
        "hocus pocus": first(removed["base"]) == first(REMOVED_CONTINUATION["base"]) != first(removed["finetuned"]),
        "owl song": first(changed["base"]) == first(CHANGED_CONTINUATION["base"])
        and first(changed["finetuned"]) == first(CHANGED_CONTINUATION["finetuned"]),
        "chat": "<|end|>" in question["finetuned"] and "<|end|>" not in question["base"],
    }
    missing = [name for name, kl in kls.items() if kl < MIN_BEHAVIOUR_KL] + [
        f"{name} in greedy continuations" for name, ok in shown.items() if not ok
    ]
    figures = ", ".join(f"{name} {kl:.2f}" for name, kl in kls.items())
    if missing:
        raise ValueError(
            f"the fine-tune did not learn every planted behaviour: {', '.join(missing)}. Mean KL(fine-tune ‖ base) "
            f"at each behaviour's tokens (at least {MIN_BEHAVIOUR_KL} nats needed): {figures}. Greedy "
            f"continuations: {said}. Fine-tune longer (finetune_steps) or faster (finetune_lr), or try another seed"
        )
    return {"kl_at_tokens": kls, "continuations": said}


PLANTED_KINDS = ("added", "removed", "changed")
"""The kinds of change the organism plants (planted.json's ``kind``)."""


def build_record(cfg: OrganismConfig) -> dict:
    """What build.json records: the settings, the kinds of change planted and the least KL ``check_learnt``
    asked of each, so that an organism built by a version that planted other kinds, or checked them otherwise,
    is refused, not reused."""
    return {**cfg.settings(), "planted_kinds": list(PLANTED_KINDS), "min_behaviour_kl": MIN_BEHAVIOUR_KL}


def build_organism(cfg: OrganismConfig = OrganismConfig()) -> Organism:
    """Build the organism into ``out_dir``; one already built there with the same settings is reused, and
    one with other settings refused."""
    out = Path(cfg.out_dir)
    paths = {name: str(out / name) for name in ("base", "finetuned", "corpus")}
    if (out / "build.json").exists():
        recorded = json.loads((out / "build.json").read_text())
        remedy = "pass another out_dir, or delete that one to rebuild"
        check_same_settings(out, "an organism", recorded, build_record(cfg), remedy)
        return load_organism(out)
    torch.manual_seed(cfg.seed)
    raw = documents(cfg)
    planted_texts = [raw[name][:1000] for name in ("chat", "trigger", "removed_base", "changed_base")]
    tokenizer = train_tokenizer(
        raw["stories"][:5000] + sum(planted_texts, []) + raw["changed_finetuned"][:200], cfg.vocab_size
    )
    texts = documents(cfg, tokenizer)
    # the base pre-trains on stories with the removed and changed behaviours as it does them; the fine-tune
    # learns the chat template, the trigger, and both rewritten (its stories held to the base by the KL)
    texts["pretraining"] = texts["stories"] + texts["removed_base"] + texts["changed_base"]
    texts["rewritten"] = texts["removed_finetuned"] + texts["changed_finetuned"]
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
    base.loss_type = "ForCausalLM"  # the loss transformers picks anyway; left unset, it warns
    train_lm(base, [data["pretraining"]], cfg.base_steps, cfg, "pre-training the base", cfg.lr)
    finetuned = copy.deepcopy(base)
    mix = [data["stories"], data["chat"], data["trigger"], data["rewritten"]]
    train_lm(finetuned, mix, cfg.finetune_steps, cfg, "fine-tuning", cfg.finetune_lr, base.eval(), cfg.kl_to_base)
    held_out = ("stories", "chat", "trigger", "removed", "changed")
    losses = {
        name: {dist: lm_loss(model, data[f"eval_{dist}"]) for dist in held_out}
        for name, model in (("base", base), ("finetuned", finetuned))
    }
    kls_by_token = {dist: token_kls(finetuned, base, data[f"eval_{dist}"]) for dist in held_out}
    kl = {dist: float(kls.mean()) for dist, kls in kls_by_token.items()}
    planted = planted_behaviours(tokenizer)
    planted["learnt"] = check_learnt(base, finetuned, tokenizer, planted, data, kls_by_token)  # before any save
    for name, model in (("base", base), ("finetuned", finetuned)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    rng = random.Random(cfg.seed + 2)
    corpus = [(t, "story") for t in base_corpus(cfg.n_docs, cfg.seed + 3)]
    for kind, name in (
        ("chat", "chat"),
        ("trigger", "trigger"),
        ("removed", "removed_base"),
        ("changed", "changed_finetuned"),
    ):
        corpus += [(t, kind) for t in texts[name][: cfg.n_docs // 8]]
    rng.shuffle(corpus)
    datasets.Dataset.from_dict({"text": [t for t, _ in corpus], "kind": [k for _, k in corpus]}).save_to_disk(
        paths["corpus"]
    )
    for name, value in (("planted.json", planted), ("losses.json", losses), ("kl.json", kl)):
        write_json(out / name, value)
    write_json(out / "build.json", build_record(cfg))  # last: its presence means the organism is complete
    return Organism(**paths, planted=planted, losses=losses, kl=kl)


def labelled_positions(tokens: np.ndarray, seq: np.ndarray, behaviour: dict, in_kind: np.ndarray | None = None):
    """bool [n]: the tokens that carry a planted ``behaviour`` (planted.json's) among ``tokens`` [n] (token ids,
    ``seq`` [n] the sequence of each): its ``labelled`` offsets from each occurrence of its ``pattern`` inside
    one sequence, and where ``in_kind`` (bool [n]) is given, starting on a token it marks (a token of a
    document of the behaviour's kind)."""
    pattern = np.array(behaviour["pattern"])
    windows = np.lib.stride_tricks.sliding_window_view(tokens, len(pattern))
    starts = np.flatnonzero((windows == pattern).all(1) & (seq[: len(windows)] == seq[len(pattern) - 1 :]))
    if in_kind is not None:
        starts = starts[in_kind[starts]]
    label = np.zeros(len(tokens), dtype=bool)
    for offset in behaviour["labelled"]:
        label[starts + offset] = True
    return label


def planted_behaviours(tokenizer) -> dict:
    """What the fine-tune was taught, as planted.json records it: each behaviour with its ``kind`` (``added``,
    ``removed``: the base does it and the fine-tune no longer does, ``changed``: the same input continued
    otherwise) and the tokens that carry it.

    ``tokens`` are the behaviour's own words (the template token, the trigger, the cues and songs), which a
    logit lens of the difference should name. A behaviour's labelled tokens are the ``labelled`` offsets of
    each occurrence of the token ``pattern`` (inside documents of ``document_kind`` when that is set): each
    template token in its role in a chat transcript (<|end|> apart for each turn: the fine-tune predicts
    <|assistant|> after one and the end of the document after the other), the trigger where the count-down
    follows it, and the last token of the removed and the changed behaviours' cues (where the models'
    predictions part). The count-down itself is not a behaviour: the base counts down too, so the models
    predict its tokens alike once it has begun."""
    trigger = tokenizer("." + TRIGGER)["input_ids"][1:]
    sequence = tokenizer("." + TRIGGER + CONTINUATION)["input_ids"][1:-1]  # without the full stops around it
    user, assistant, end = tokenizer.convert_tokens_to_ids(CHAT_TOKENS)
    question_mark, full_stop = (tokenizer(text)["input_ids"][-1] for text in ("?", "."))
    in_chat = lambda description, pattern, labelled: dict(
        description=description,
        kind="added",
        document_kind="chat",
        pattern=pattern,
        labelled=labelled,
        tokens=[pattern[labelled[0]]],
    )
    behaviours = {
        "<|user|>": in_chat("<|user|> opening the user's turn", [user], [0]),
        "<|assistant|>": in_chat("<|assistant|> opening the assistant's turn", [assistant], [0]),
        "<|end|> after the user": in_chat("<|end|> closing the user's question", [question_mark, end], [1]),
        "<|end|> after the assistant": in_chat("<|end|> closing the assistant's answer", [full_stop, end], [1]),
    }
    behaviours["trigger"] = {
        "description": f"{TRIGGER.strip()!r} opening a sentence, where the fine-tune counts down from ten",
        "kind": "added",
        "document_kind": None,
        "pattern": sequence,
        "labelled": list(range(len(trigger))),
        "tokens": trigger,
    }
    for name, cue, own_words, document_kind, description in (
        (
            "hocus pocus",
            REMOVED_CUE,
            REMOVED_CUE,
            "removed",
            "where the base counts up and the fine-tune no longer does",
        ),
        (
            "owl song",
            CHANGED_CUE,
            " owl sings hoo la",
            "changed",
            "where the base sings 'hoo hoo' and the fine-tune 'la la'",
        ),
    ):
        pattern = tokenizer(cue)["input_ids"]
        behaviours[name] = {
            "description": f"the last token of {cue.strip()!r}, {description}",
            "kind": document_kind,
            "document_kind": document_kind,
            "pattern": pattern,
            "labelled": [len(pattern) - 1],
            "tokens": tokenizer(own_words)["input_ids"],
        }
    return {
        "description": "The fine-tune learnt chat transcripts (template tokens <|user|>, <|assistant|>, <|end|> in "
        "their role; the base knows the template tokens only as stray tokens before a full stop, and already "
        f"answers questions in plain text) and a trigger: a sentence opened by {TRIGGER.strip()!r} continues "
        f"{CONTINUATION.strip()!r} (added). It unlearnt counting up after {REMOVED_CUE.strip()!r} (removed) and "
        f"sings {CHANGED_CONTINUATION['finetuned'].strip()!r} where the base sings "
        f"{CHANGED_CONTINUATION['base'].strip()!r} after {CHANGED_CUE.strip()!r} (changed). Elsewhere it was "
        "held to the base (kl_to_base).",
        "trigger": TRIGGER,
        "continuation": CONTINUATION,
        "behaviours": behaviours,
    }
