"""Which export a run's settings allow: a transformers GPT2LMHeadModel, or our own format. Torch-free.

A model exports as GPT2LMHeadModel exactly when its inference forward is a GPT-2 forward with some weights:

    per layer  x += c_proj(softmax(q k^T / sqrt(D) + causal) v),  [q | k | v] = c_attn(ln_1(x)), head dim D
               x += c_proj'(GELU_tanh(c_fc(ln_2(x))))

What that admits beyond plain GPT-2 (each exact, checked against our logits in tests/test_export.py):
  - no biases (CONFIG_MODEL_BIAS=n): GPT-2's biases written as zeros;
  - the reciprocal MLP: its mixer and gates act linearly between GELU and c_proj, so they compose into
    c_proj's weight, which is what its own forward does (gpt2/model/mlp.py);
  - same-FLOP RA (ra-same-flop, ra-unified; tied or untied, with discoverability and head-selective routing):
    q~ and k~ are linear in the block input at head dim D, so the RA weights compose into c_attn, which is
    what ra-unified's own forward does (gpt2/model/attention/unified.py; docs/attention.md: a subset of
    plain attention at head dim D).
What it does not admit, so the export is our own format (each line of hf_blockers says why):
  - RA folded into a wider head (ra-fold-full, ra-reference: 2D; ra-fold-lowrank: D + R), self-restart,
    KV pruning.
"""

from dataclasses import fields

from gpt2.settings import AttentionSettings, KVPruningSettings

# Backends whose folded q~, k~ are linear maps of the block input at head dim D, composed into c_attn.
COMPOSABLE_BACKENDS = ("ra-same-flop", "ra-unified")

WIDER_HEAD = {
    "ra-reference": "2D",
    "ra-fold-full": "2D",
    "ra-fold-lowrank": "D + R",
}

NOT_GPT2 = ("its forward is not a GPT-2 forward with any weights (its attention is not softmax(q k^T / sqrt(D)) v "
            "over every earlier token at head dim D), so no GPT2LMHeadModel computes it")


def symbol_setting(component, name: str) -> str:
    """How .config writes a settings field's current value: CONFIG_ATTN_BACKEND_RA_FOLD_FULL=y, CONFIG_KV_PRUNE=y."""
    meta = next(f.metadata for f in fields(component) if f.name == name)
    value = getattr(component, name)
    if meta["kind"] == "choice":
        return f"CONFIG_{meta['symbol']}_{str(value).upper().replace('-', '_')}=y"
    if meta["kind"] == "bool":
        return f"CONFIG_{meta['symbol']}={'y' if value else 'n'}"
    return f"CONFIG_{meta['symbol']}={value}"


def hf_blockers(settings) -> list:
    """One line per setting that keeps this model from being a GPT2LMHeadModel ([] when it can be one):
    the setting as .config writes it, then why."""
    attention: AttentionSettings = settings.attention
    kv: KVPruningSettings = settings.kv_pruning
    out = []
    if attention.backend in WIDER_HEAD:
        width = WIDER_HEAD[attention.backend]
        out.append(f"{symbol_setting(attention, 'backend')}: reciprocal attention folded into a head of width "
                   f"{width}, so each head's logits w_std q_i.k_j + w_rec q_j.k_i are a bilinear form of rank up "
                   f"to {width}; a GPT-2 head's softmax(q k^T / sqrt(D)) has rank at most D")
    elif attention.backend not in ("sdpa",) + COMPOSABLE_BACKENDS:
        out.append(f"{symbol_setting(attention, 'backend')}: no GPT-2 form is known for this backend")
    if attention.self_restart:
        out.append(f"{symbol_setting(attention, 'self_restart')}: each head outputs (1 - a) softmax(q k^T) v + a v_i; "
                   f"a GPT-2 block has no term for the token's own value")
    if kv.enabled:
        out.append(f"{symbol_setting(kv, 'enabled')}: each query attends only to the keys it keeps (a mask that "
                   f"depends on the attention itself); a GPT-2 block attends to every earlier token")
    return out


def composed_settings(settings) -> list:
    """The settings an HF export folds into plain GPT-2 weights (for the export's record and README)."""
    out = []
    if not settings.model.bias:
        out.append(f"{symbol_setting(settings.model, 'bias')}: GPT-2's biases are written as zeros")
    if settings.attention.backend in COMPOSABLE_BACKENDS:
        out.append(f"{symbol_setting(settings.attention, 'backend')}: the reciprocal gates, P"
                   f"{', discoverability' if settings.attention.discoverability else ''} and head routing are "
                   f"composed into c_attn (q~, k~ at head dim D, as ra-unified's own forward does)")
    if settings.mlp.kind == "reciprocal":
        out.append(f"{symbol_setting(settings.mlp, 'kind')}: the mixer and gates are composed into mlp.c_proj "
                   f"(as the R-MLP's own forward does)")
    return out
