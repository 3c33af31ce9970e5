"""Every attention backend and what it needs of the head dimension. Torch-free: the configuration loader,
menuconfig, planning and reports read it without importing torch; `Backend.load` imports the module itself.

A head has D = n_embd / n_head dims. A backend with a reciprocal rank R either appends R dims to the head
(ra-fold-lowrank: q~ = [q, P^T k] with P a D x R matrix of orthonormal columns, so R <= D) or takes them from
the standard term (ra-same-flop, ra-unified: D_std + R (+ 1) = D, keeping D_std >= 1), where the
discoverability bias also takes one dim because k~ does not hold the full key. Hence

    1 <= R <= D - standard_dims_kept - (discoverability_dims if discoverability else 0).

The same-FLOP backends come in two forms (CONFIG_ATTN_RA_FORM). Tied (the default): P is (D_std x R) and
reads only the D_std = D - R (- 1) standard dims, so P needs D_std >= R, i.e. R <= (D - disc dims) / 2.
Untied: P is D x R and reads the whole head, which spans plain attention at head dim D (see docs/attention.md).

Adding a backend is its module, its entry in BACKENDS and its member of the CONFIG_ATTN_BACKEND choice
(kconfig/attention.Kconfig); tests/test_registry.py keeps the last two in step.
"""

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str  # the CONFIG_ATTN_BACKEND member, lower-cased, '_' -> '-' (ATTN_BACKEND_RA_UNIFIED -> ra-unified)
    module: str  # module of gpt2.model.attention that defines the class
    class_name: str
    uses_rank: bool = False  # reads CONFIG_ATTN_RA_RANK
    standard_dims_kept: int = 0  # head dims R may never take (ra-same-flop keeps at least one standard dim)
    discoverability_dims: int = 0  # head dims the discoverability bias takes from R's share when it is on
    has_forms: bool = False  # tied | untied (CONFIG_ATTN_RA_FORM); tied unless "untied" is asked for

    def tied(self, form: str) -> bool:
        return self.has_forms and form != "untied"

    def rank_range(self, head_dim: int, discoverability: bool, form: str = "untied"):
        """(low, high): the legal R for head dim D, or None when the backend has no R."""
        if not self.uses_rank:
            return None
        free = head_dim - (self.discoverability_dims if discoverability else 0)
        if self.tied(form):
            return 1, free // 2  # P (D_std x R) with D_std = free - R >= R
        return 1, free - self.standard_dims_kept

    def check_rank(self, head_dim: int, rank: int, discoverability: bool, form: str = "untied") -> None:
        """ValueError naming CONFIG_ATTN_RA_RANK when R is outside rank_range."""
        legal = self.rank_range(head_dim, discoverability, form)
        if legal is None or legal[0] <= rank <= legal[1]:
            return
        if self.tied(form):
            disc = " less the discoverability dim" if discoverability and self.discoverability_dims else ""
            raise ValueError(f"CONFIG_ATTN_RA_RANK={rank} is outside {legal[0]}..{legal[1]} (head dim {head_dim}; "
                             f"tied {self.name} reads R reciprocal dims from the D - R standard ones, so R is at "
                             f"most half the head{disc}; CONFIG_ATTN_RA_FORM_UNTIED lifts that)")
        reserved = []
        if self.standard_dims_kept:
            reserved.append(f"{self.standard_dims_kept} standard dim")
        if discoverability and self.discoverability_dims:
            reserved.append(f"{self.discoverability_dims} for the discoverability bias")
        why = f"; {self.name} keeps {' and '.join(reserved)}" if reserved else ""
        raise ValueError(f"CONFIG_ATTN_RA_RANK={rank} is outside {legal[0]}..{legal[1]} (head dim {head_dim}{why})")

    def load(self):
        """The backend's nn.Module class (this imports torch)."""
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), self.class_name)


BACKENDS = {b.name: b for b in (
    Backend("sdpa", "sdpa", "SDPAAttention"),
    Backend("ra-reference", "reference", "RAReferenceAttention"),
    Backend("ra-fold-full", "fold_full", "RAFoldFullAttention"),
    Backend("ra-fold-lowrank", "fold_lowrank", "RAFoldLowRankAttention", uses_rank=True),
    Backend("ra-same-flop", "same_flop", "RASameFlopAttention", uses_rank=True, standard_dims_kept=1,
            discoverability_dims=1, has_forms=True),
    Backend("ra-unified", "unified", "RAUnifiedAttention", uses_rank=True, standard_dims_kept=1,
            discoverability_dims=1, has_forms=True),
)}


def lookup(name: str) -> Backend:
    """The registry entry of CONFIG_ATTN_BACKEND=name; ValueError listing the known ones otherwise."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"CONFIG_ATTN_BACKEND={name!r} is unknown; choose one of {sorted(BACKENDS)}") from None
