"""Dictionary health: how much of a crosscoder's dictionary is in use on held-out tokens.

A latent is *dead* when it fires on none of the held-out tokens read. Two live latents *duplicate* each
other when they fire on nearly the same tokens (Jaccard overlap of their firing sets at least 0.9) or
write nearly the same vector (cosine of their decoders, all models' halves together, at least 0.99);
duplicates form groups (connected components), and the *effective dictionary size* counts each group
once: the live latents that are different things the crosscoder learnt.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..crosscoder import CrossCoder
from ..files import read_json, write_json
from .encoding import Encoded

SAME_TOKENS = 0.9
"""Firing Jaccard overlap at which two latents duplicate each other."""
SAME_DECODER = 0.99
"""Decoder cosine at which two latents duplicate each other."""
MAX_DEAD = 0.10
"""Dead fraction of the dictionary above which a run is warned."""
MAX_DUPLICATES = 0.02
"""Duplicate groups per live latent above which a run is warned."""


class Health(NamedTuple):
    dict_size: int
    n_tokens: int
    """Held-out tokens the latents were read on."""
    dead: list[int]
    """Latents that fire on none of them."""
    groups: list[list[int]]
    """Groups of live latents that duplicate one another, each in ascending order."""

    @property
    def live(self) -> int:
        return self.dict_size - len(self.dead)

    @property
    def dead_fraction(self) -> float:
        return len(self.dead) / self.dict_size

    @property
    def duplicate_fraction(self) -> float:
        """Duplicate groups per live latent."""
        return len(self.groups) / max(self.live, 1)

    @property
    def effective_size(self) -> int:
        """Live latents, each duplicate group counted once."""
        return self.live - sum(len(group) - 1 for group in self.groups)

    def summary(self) -> dict:
        """The numbers a report shows (wandb's run summary, 04's summary.json)."""
        return {
            "dict_size": self.dict_size,
            "heldout_tokens": self.n_tokens,
            "dead": len(self.dead),
            "dead_fraction": self.dead_fraction,
            "duplicate_groups": len(self.groups),
            "latents_in_duplicate_groups": sum(map(len, self.groups)),
            "duplicate_fraction": self.duplicate_fraction,
            "effective_size": self.effective_size,
        }

    def save(self, path: str | Path) -> None:
        """health.json: the summary's numbers, the dead latents and the groups."""
        write_json(path, {**self.summary(), "dead_latents": self.dead, "groups": self.groups})

    @classmethod
    def load(cls, path: str | Path) -> Health:
        saved = read_json(path)
        return cls(saved["dict_size"], saved["heldout_tokens"], saved["dead_latents"], saved["groups"])

    def report(self, variant: str) -> str:
        """The health line and, past a threshold, a warning line with the fix (``variant``: the crosscoder's)."""
        return "\n".join([str(self), *(f"warning: {warning}" for warning in self.warnings(variant))])

    def __str__(self) -> str:
        return (
            f"dictionary health on {self.n_tokens:,} held-out tokens: {len(self.dead)} of {self.dict_size} latents"
            f" dead ({self.dead_fraction:.1%}); {len(self.groups)} duplicate groups among the {self.live} live"
            f" ({self.duplicate_fraction:.1%}, {sum(map(len, self.groups))} latents); effective dictionary size"
            f" {self.effective_size}"
        )

    def warnings(self, variant: str) -> list[str]:
        """What crossed a threshold, each with its fix."""
        out = []
        if self.dead_fraction > MAX_DEAD:
            fix = "raise aux_coeff (AuxK)" if variant == "batchtopk" else "lower l1_coeff"
            out.append(
                f"{self.dead_fraction:.0%} of the dictionary is dead (over {MAX_DEAD:.0%}): use a smaller dict_size"
                f" (the data may hold fewer directions than latents) or {fix}"
            )
        if self.duplicate_fraction > MAX_DUPLICATES:
            fix = (
                "a smaller dict_size"
                if variant == "batchtopk"
                else "set tanh_scale (measured for the organism: 0.015; raise it until the groups go, watching the"
                " dead latents) or a smaller dict_size"
            )
            out.append(
                f"{len(self.groups)} duplicate groups ({self.duplicate_fraction:.1%} of the live latents, over"
                f" {MAX_DUPLICATES:.0%}): several latents learnt one thing; {fix} leaves fewer (04 shows one"
                " latent per group)"
            )
        return out


def same_token_pairs(token: torch.Tensor, latent: torch.Tensor, n_tokens: int, dict_size: int) -> torch.Tensor:
    """int64 [n, 2] latent pairs (i < j) whose firing sets overlap by ``SAME_TOKENS`` (Jaccard) or more, from
    where they fire: ``latent`` fires on ``token`` (int64 [nnz] each, token indices below ``n_tokens``)."""
    fired = torch.sparse_coo_tensor(
        torch.stack([token, latent]),
        torch.ones(len(token), device=token.device),
        (n_tokens, dict_size),
        check_invariants=False,
    ).coalesce()
    with warnings.catch_warnings():  # torch calls its sparse-sparse product beta
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        together = torch.sparse.mm(fired.t().coalesce(), fired).coalesce()  # [dict, dict] tokens both fire on
    (i, j), shared = together.indices(), together.values()
    size = torch.bincount(latent, minlength=dict_size).float()
    same = (i < j) & (shared >= SAME_TOKENS * (size[i] + size[j] - shared))
    return torch.stack([i[same], j[same]], 1)


def same_decoder_pairs(decoders: torch.Tensor) -> torch.Tensor:
    """int64 [n, 2] latent pairs (i < j) whose ``decoders`` [dict_size, n_models, d_model] (all models' halves
    together) have a cosine of ``SAME_DECODER`` or more."""
    unit = F.normalize(decoders.detach().flatten(1).float(), dim=-1)
    pairs = []
    for start in range(0, len(unit), 4096):
        a, b = (unit[start : start + 4096] @ unit.T >= SAME_DECODER).nonzero(as_tuple=True)
        a = a + start
        pairs.append(torch.stack([a[a < b], b[a < b]], 1))
    return torch.cat(pairs)


def connected_groups(pairs: torch.Tensor, live: torch.Tensor) -> list[list[int]]:
    """The groups (connected components, ascending, of two or more) that ``pairs`` [n, 2] of linked items form
    among the ``live`` ones (bool [n_items])."""
    root = list(range(len(live)))

    def find(a: int) -> int:
        while root[a] != a:
            root[a] = root[root[a]]
            a = root[a]
        return a

    for a, b in pairs[live[pairs].all(1)].tolist():
        root[find(b)] = find(a)
    groups: dict[int, list[int]] = {}
    for latent in live.nonzero().squeeze(1).tolist():
        groups.setdefault(find(latent), []).append(latent)
    return [group for group in groups.values() if len(group) > 1]


def dictionary_health(cc: CrossCoder, encoded: Encoded) -> Health:
    """The dead latents and the duplicate groups of ``cc`` on the tokens ``encoded`` read."""
    live = torch.bincount(encoded.latent, minlength=cc.cfg.dict_size) > 0
    pairs = torch.cat(
        [
            same_token_pairs(encoded.token, encoded.latent, encoded.n_tokens, cc.cfg.dict_size),
            same_decoder_pairs(cc.W_dec.cpu()),
        ]
    )
    groups = connected_groups(pairs, live)
    return Health(cc.cfg.dict_size, encoded.n_tokens, (~live).nonzero().squeeze(1).tolist(), groups)
