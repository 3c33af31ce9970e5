"""Zero-shot multiple choice by log-likelihood, scored the way lm-evaluation-harness scores it.

An item is a query q and choices a_1..a_k (lib/evaluate/hellaswag.py poses them). Choice i is the continuation
" " + a_i (the harness's target delimiter) and is scored by its summed log-likelihood given the query:

    ll_i = sum over the continuation's tokens x_t of log p(x_t | x_<t)

Tokens, as the harness's encode pair: ctx = enc(q); cont = enc(q + " " + a_i)[len(ctx):], so a BPE merge across
the boundary counts as continuation (trailing spaces of q would move into the continuation first; a cleaned
query has none). Window: w = (ctx + cont)[-(T + 1):], left truncation to the block size T; the model reads w[:-1]
and the last n_i = min(len(cont), len(w) - 1) of the targets w[1:] are scored (an ending longer than the block
is scored on its last T tokens; the harness would index past the window there).

Predictions take the first maximum on ties, as numpy.argmax does:
    acc              argmax_i ll_i
    acc_norm         argmax_i ll_i / len(a_i)                   characters of the cleaned ending, no leading space:
                                                                the harness's acc_norm (what papers call acc_norm)
    acc_bytes        argmax_i ll_i / len(a_i.encode("utf-8"))   the harness's acc_bytes; equals acc_norm on ASCII
    acc_norm_tokens  argmax_i ll_i / n_i                        mean log-likelihood per token: the normalisation of
                                                                llm.c and Karpathy's hellaswag.py ("acc_norm" there,
                                                                on the raw ctx and endings, so not this number)
Each comes with the harness's standard error of a mean: sample standard deviation (n - 1) / sqrt(n).

Sequences of every item are scored together, longest first, in batches of `batch_size` right-padded rows:
causal attention keeps the padding out of every scored position.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

METRICS = ("acc", "acc_norm", "acc_bytes", "acc_norm_tokens")


@dataclass(frozen=True)
class Request:
    item: int
    choice: int
    tokens: tuple  # the window w: model input w[:-1], targets w[1:]
    scored: int  # n: the last n targets are the continuation's
    truncated: bool  # the window lost tokens on the left


@dataclass
class ItemScores:
    """Per item and choice: summed log-likelihood and scored token count; per item: any window truncated."""
    loglikelihood: np.ndarray  # (items, choices) float64
    tokens: np.ndarray  # (items, choices) int
    truncated: np.ndarray  # (items,) bool


def encode_pair(encode, context: str, continuation: str) -> tuple:
    """(context tokens, continuation tokens) as the harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    context_tokens = encode(context)
    return context_tokens, whole[len(context_tokens):]


def requests_for(items, encode, block_size: int) -> list:
    """One Request per (item, choice)."""
    requests = []
    for item_index, item in enumerate(items):
        for choice_index, choice in enumerate(item.choices):
            context, continuation = encode_pair(encode, item.query, " " + choice)
            if not continuation:
                raise ValueError(f"item {item.ind}, choice {choice_index}: the ending {choice!r} encodes to no tokens")
            whole = context + continuation
            window = whole[-(block_size + 1):]
            requests.append(Request(item_index, choice_index, tuple(window),
                                    min(len(continuation), len(window) - 1), len(window) < len(whole)))
    return requests


@torch.no_grad()
def score_items(items, encode, logits_of, block_size: int, device, batch_size: int = 32,
                autocast=None, progress=None) -> ItemScores:
    """Summed log-likelihood of every choice of every item.

    encode: str -> list of token ids (the model's tokenizer). logits_of: (B, T) int64 on device -> (B, T, V)
    logits (our GPT: lambda idx: model(idx)[0]; a transformers model: lambda idx: hf(idx).logits).
    autocast: a factory of autocast contexts (gpt2.train.step.autocast_context), or None for none.
    progress: called with the number of requests scored so far.
    """
    requests = requests_for(items, encode, block_size)
    choices = max(len(item.choices) for item in items)
    loglikelihood = np.full((len(items), choices), -np.inf)
    tokens = np.zeros((len(items), choices), dtype=np.int64)
    truncated = np.zeros(len(items), dtype=bool)
    sums = score_windows([(r.tokens, r.scored) for r in requests], logits_of, device, batch_size, autocast,
                         progress=progress)
    for request, value in zip(requests, sums):
        loglikelihood[request.item, request.choice] = value
        tokens[request.item, request.choice] = request.scored
        truncated[request.item] |= request.truncated
    return ItemScores(loglikelihood, tokens, truncated)


@torch.no_grad()
def score_windows(windows, logits_of, device, batch_size: int, autocast=None, greedy=False, progress=None) -> list:
    """For each window (tokens w, n): the summed log-probability of the last n targets of w[1:] given what comes
    before them, read from one forward of w[:-1]; with greedy, (that sum, whether every one of those targets is
    the argmax at its position). In the windows' order.

    The windows are scored longest first (little padding) in batches of `batch_size` right-padded rows: causal
    attention keeps the padding out of every scored position. Only the scored positions go through log-softmax
    (B x T x V log-probabilities would be gigabytes at GPT-2's vocabulary). lm-evaluation-harness's model adapter
    (lib/export/scoring.py) scores its requests here too."""
    results = [None] * len(windows)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    for begin in range(0, len(order), batch_size):
        chunk = order[begin:begin + batch_size]
        for i, value in zip(chunk, _batch_loglikelihood([windows[i] for i in chunk], logits_of, device, autocast,
                                                        greedy)):
            results[i] = value
        if progress:
            progress(min(begin + batch_size, len(order)))
    return results


def _batch_loglikelihood(batch, logits_of, device, autocast, greedy) -> list:
    """score_windows for one batch (float64 sums, one forward pass)."""
    width = max(len(tokens) for tokens, _ in batch) - 1
    inputs = torch.zeros((len(batch), width), dtype=torch.long)  # right padding: id 0, never scored
    rows, positions, targets = [], [], []
    for row, (tokens, scored) in enumerate(batch):
        length = len(tokens) - 1
        inputs[row, :length] = torch.tensor(tokens[:-1])
        for position in range(length - scored, length):
            rows.append(row)
            positions.append(position)
            targets.append(tokens[position + 1])
    with autocast() if autocast else nullcontext():
        logits = logits_of(inputs.to(device))
    rows_t = torch.tensor(rows, device=logits.device, dtype=torch.long)
    picked = logits[rows_t, torch.tensor(positions, device=logits.device, dtype=torch.long)].float()  # (targets, V)
    targets_t = torch.tensor(targets, device=logits.device, dtype=torch.long)
    target_log_probs = torch.log_softmax(picked, dim=-1).gather(1, targets_t[:, None])[:, 0].double()
    sums = torch.zeros(len(batch), dtype=torch.float64, device=logits.device).index_add_(0, rows_t, target_log_probs)
    if not greedy:
        return sums.tolist()
    misses = torch.zeros(len(batch), dtype=torch.long, device=logits.device).index_add_(
        0, rows_t, (picked.argmax(-1) != targets_t).long())
    return [(s, m == 0) for s, m in zip(sums.tolist(), misses.tolist())]


def _first_argmax(values: np.ndarray) -> np.ndarray:
    return np.argmax(values, axis=1)  # numpy's argmax returns the first maximum, as the harness's does


def _mean_and_stderr(correct: np.ndarray) -> tuple:
    n = len(correct)
    mean = float(correct.mean())
    stderr = float(correct.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return mean, stderr


def metrics(items, scores: ItemScores) -> dict:
    """acc, acc_norm, acc_bytes, acc_norm_tokens (module doc) with their standard errors, over the items."""
    gold = np.array([item.gold for item in items])
    chars = np.array([[len(c) for c in item.choices] for item in items], dtype=np.float64)
    utf8 = np.array([[len(c.encode("utf-8")) for c in item.choices] for item in items], dtype=np.float64)
    ll = scores.loglikelihood
    with np.errstate(divide="ignore", invalid="ignore"):  # an ending cleaned to "" divides by 0, as in the harness
        predictions = {"acc": _first_argmax(ll), "acc_norm": _first_argmax(ll / chars),
                       "acc_bytes": _first_argmax(ll / utf8), "acc_norm_tokens": _first_argmax(ll / scores.tokens)}
    out = {}
    for name in METRICS:
        mean, stderr = _mean_and_stderr((predictions[name] == gold).astype(np.float64))
        out[name], out[f"{name}_stderr"] = mean, stderr
    return out
