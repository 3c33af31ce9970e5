"""The attention backend registry: torch-free, in step with the Kconfig choice, and the one rule for R."""

import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.model.attention import build_attention
from gpt2.model.attention.common import AttentionBase
from gpt2.model.attention.registry import BACKENDS, lookup
from lib import config as cfg
from test_attention_helpers import attn_settings, kv_settings, model_settings

RANKED = [name for name, backend in BACKENDS.items() if backend.uses_rank]
# (backend, form): the same-FLOP backends in both forms (CONFIG_ATTN_RA_FORM), the others with none
RANKED_FORMS = [(name, form) for name in RANKED
                for form in (("tied", "untied") if BACKENDS[name].has_forms else ("",))]


def test_registry_and_config_loader_import_without_torch():
    # torch = None in sys.modules makes any `import torch` fail, however indirect.
    code = ("import sys; sys.modules['torch'] = None; "
            "import gpt2.model.attention.registry, lib.config; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_every_backend_choice_member_has_a_registry_entry_and_back():
    kconf = cfg.load_kconfig()
    prefix = "ATTN_BACKEND_"
    (choice,) = [c for c in kconf.choices if c.syms and all(s.name.startswith(prefix) for s in c.syms)]
    members = {s.name[len(prefix):].lower().replace("_", "-") for s in choice.syms}
    assert members == set(BACKENDS)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_entry_names_its_backend_class(name):
    cls = BACKENDS[name].load()
    assert issubclass(cls, AttentionBase) and cls.__name__ == BACKENDS[name].class_name


def test_rank_ranges_at_head_dim_64():
    assert lookup("sdpa").rank_range(64, False) is None
    assert lookup("ra-fold-full").rank_range(64, True) is None
    assert lookup("ra-fold-lowrank").rank_range(64, True) == (1, 64)      # R dims appended, P is D x R
    for name in ("ra-same-flop", "ra-unified"):                            # R dims taken, one standard dim kept
        assert lookup(name).rank_range(64, False) == (1, 63)
        assert lookup(name).rank_range(64, True) == (1, 62)               # the bias takes one more
    with pytest.raises(ValueError, match=r"CONFIG_ATTN_BACKEND='ra-magic' is unknown"):
        lookup("ra-magic")


@pytest.mark.parametrize("disc", [False, True])
@pytest.mark.parametrize("name, form", RANKED_FORMS)
def test_rank_limit_reaches_config_validation(name, form, disc, make_config, tmp_path):
    base = make_config()
    head_dim = cfg.load_settings(base, environ={}).model.head_dim
    low, high = BACKENDS[name].rank_range(head_dim, disc, form or "untied")
    member = "ATTN_BACKEND_" + name.upper().replace("-", "_")
    overrides = {member: "y", "ATTN_DISCOVERABILITY": "y" if disc else "n"}
    if form:
        overrides["ATTN_RA_FORM_" + form.upper()] = "y"
    cfg.write_cell_config(base, {**overrides, "ATTN_RA_RANK": str(high)}, tmp_path / "top")
    assert cfg.load_settings(tmp_path / "top", environ={}).attention.reciprocal_rank == high
    with pytest.raises(cfg.ConfigError, match=rf"CONFIG_ATTN_RA_RANK={high + 1} is outside {low}\.\.{high} "
                                              rf"\(head dim {head_dim}"):
        cfg.write_cell_config(base, {**overrides, "ATTN_RA_RANK": str(high + 1)}, tmp_path / "over")
    assert not (tmp_path / "over").exists()


@pytest.mark.parametrize("name, form", RANKED_FORMS)
def test_model_construction_refuses_the_same_ranks(name, form):
    model = model_settings(n_embd=32, n_head=4)  # head dim 8
    low, high = BACKENDS[name].rank_range(8, True, form or "untied")
    build_attention(model, attn_settings(name, rank=high, disc=True, form=form), kv_settings(), 0)
    with pytest.raises(ValueError, match=rf"CONFIG_ATTN_RA_RANK={high + 1} is outside {low}\.\.{high} \(head dim 8"):
        build_attention(model, attn_settings(name, rank=high + 1, disc=True, form=form), kv_settings(), 0)


def test_tied_form_takes_at_most_half_the_head():
    """Tied same-FLOP RA: P (D_std x R) reads the D_std standard dims, so D_std >= R: R <= (D - disc) / 2."""
    for name in ("ra-same-flop", "ra-unified"):
        assert BACKENDS[name].rank_range(64, False, "tied") == (1, 32)
        assert BACKENDS[name].rank_range(64, True, "tied") == (1, 31)
        assert BACKENDS[name].rank_range(64, True, "") == (1, 31)  # "" (dependency off) reads as tied
        assert BACKENDS[name].rank_range(64, True, "untied") == (1, 62)
