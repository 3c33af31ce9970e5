"""Scoring and greedy generation for downstream evaluation, on token ids; no lm-evaluation-harness needed.

These are the computations lm-evaluation-harness asks of a model (lib/export/harness.py adapts them to its
interface), written the way its Hugging Face model does them, so our variants and a transformers model are
evaluated alike.

Log-likelihood of a continuation c (m tokens) given a context x (at least one token), block size T:
    w = (x + c)[-(T + 1):]                  the last T + 1 tokens: the context is cut from the left
    logits = model(w[:-1])                   one full forward, T positions at most
    log p(c | x) = sum_{t=1..m} log softmax(logits[n - m + t - 1])[c_t]     n = len(w) - 1
    greedy = every c_t is the argmax at its position
(a continuation longer than T tokens has no window that scores it whole, and is refused.)

Rolling log-likelihood of a text (perplexity): the token list, prefixed with one conditioning token, is cut
into windows of at most T predicted tokens, each predicted token once and with as much context as fits
(lm-evaluation-harness's get_rolling_token_windows with context_len = 1, in its disjoint form); the text's
log-likelihood is the sum over windows.
"""

import torch

from lib.evaluate.scoring import score_windows


def score_continuations(model, requests, block_size: int, batch_size: int = 16) -> list:
    """[(log p(continuation | context), greedy)] for requests [(context ids, continuation ids)], in order, scored
    in right-padded batches by lib.evaluate.scoring.score_windows."""
    windows = [_window(list(ctx), list(cont), block_size) for ctx, cont in requests]
    results = [(0.0, True) if not cont else None for _, cont in requests]  # an empty continuation: log 1
    todo = [i for i, r in enumerate(results) if r is None]
    device = next(model.parameters()).device
    scored = score_windows([windows[i] for i in todo], lambda idx: model(idx)[0], device, batch_size, greedy=True)
    for i, (logprob, greedy) in zip(todo, scored):
        results[i] = (logprob, bool(greedy))
    return results


def _window(context: list, continuation: list, block_size: int):
    """(the window w: the model reads w[:-1], and the last len(continuation) targets of w[1:] are scored)."""
    if not context:
        raise ValueError("a continuation needs at least one context token to be scored (an end-of-text prefix "
                         "for an empty context)")
    if len(continuation) > block_size:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the block size {block_size}")
    return (context + continuation)[-(block_size + 1):], len(continuation)


def rolling_windows(tokens: list, prefix_token: int, block_size: int) -> list:
    """[(context ids, continuation ids)] whose continuations are `tokens`, each once, in order: the first window
    is [prefix] + tokens[:T-1] predicting tokens[:T]; each later one predicts up to T further tokens from the
    T tokens before its last prediction (lm-evaluation-harness's rolling windows, disjoint form)."""
    if prefix_token is None:
        raise ValueError("rolling log-likelihood needs a conditioning token for the first token; this tokenizer "
                         "has no end-of-text token")
    out, done = [], 0
    while done < len(tokens):
        if done == 0:
            n = min(block_size, len(tokens))
            out.append(([prefix_token], tokens[:n]))
        else:
            n = min(block_size, len(tokens) - done)
            # the window's inputs are tokens[end - T - 1 : end - 1]; the part before the predictions is context
            end = done + n
            out.append((tokens[max(end - block_size - 1, 0): done], tokens[done:end]))
        done += n
    return out


def rolling_loglikelihood(model, tokens: list, prefix_token: int, block_size: int, batch_size: int = 16) -> float:
    """log p(tokens | prefix) with every token predicted once and with as much context as the block allows."""
    windows = rolling_windows(tokens, prefix_token, block_size)
    return sum(lp for lp, _ in score_continuations(model, windows, block_size, batch_size))


@torch.no_grad()
def greedy_tokens(model, context: list, max_new_tokens: int, block_size: int, stop=None) -> list:
    """Up to max_new_tokens greedy (argmax) tokens after `context`, one full forward each (no cache).

    The context keeps its last T - max_new_tokens tokens when that is at least one, so every step's input fits
    the block as in lm-evaluation-harness's Hugging Face model; with a larger max_new_tokens each step sees
    the last T tokens. stop(generated ids) -> bool ends generation early."""
    if not context:
        raise ValueError("generation needs at least one context token")
    keep = block_size - max_new_tokens
    tokens = list(context[-keep:]) if keep >= 1 else list(context)
    device = next(model.parameters()).device
    generated = []
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([tokens[-block_size:]], device=device))
        generated.append(int(logits[0, -1].argmax()))
        tokens.append(generated[-1])
        if stop is not None and stop(generated):
            break
    return generated


def generate_until(model, tokenizer, context: list, until: list, max_new_tokens: int, block_size: int) -> str:
    """Greedy text after `context` up to (not including) the first stop string of `until`, or max_new_tokens
    tokens, or the end-of-text token, whichever comes first."""
    eot = tokenizer.eot_token

    def stop(ids):
        return (eot is not None and ids[-1] == eot) or any(s in tokenizer.decode(_text_ids(ids, eot)) for s in until)

    ids = greedy_tokens(model, context, max_new_tokens, block_size, stop)
    return cut_at_stop(tokenizer.decode(_text_ids(ids, eot)), until)


def _text_ids(ids: list, eot) -> list:
    """The ids before the first end-of-text token (the text generated, without it)."""
    return ids[: ids.index(eot)] if eot is not None and eot in ids else ids


def cut_at_stop(text: str, until: list) -> str:
    """text up to the earliest occurrence of any stop string."""
    cuts = [text.find(s) for s in until if s and s in text]
    return text[: min(cuts)] if cuts else text
