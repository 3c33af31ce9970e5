"""lm-evaluation-harness model "gpt2-ra": our checkpoints (run or export directories, every variant) evaluated
exactly as the harness evaluates a transformers model.

    .venv/bin/python -m pip install -r extras/lm-eval.txt     (optional; make does not install it)
    python -m lib.export.harness --model gpt2-ra --model_args run=results/<run> --tasks lambada_openai
    python -m lib.export.harness --model gpt2-ra --model_args run=results/<run>/export,device=cuda --tasks ...

The arguments after `python -m lib.export.harness` are lm_eval's own: the module registers "gpt2-ra" and runs
lm_eval's command line. (The `lm_eval` command alone cannot find it: the harness has no plugin mechanism for
models, so something must import this module first; in Python, `import lib.export.harness` before
lm_eval.simple_evaluate(model="gpt2-ra", ...) does.) Model arguments: run=<dir> (a run directory or an
export), checkpoint=best|last (run directories), device=cpu|cuda (default: cuda when available),
batch_size=N, max_gen_toks=N (default 256).

The class extends the harness's TemplateLM, so contexts and continuations are tokenized exactly as for its
Hugging Face model (trailing context spaces move to the continuation; an empty context is the end-of-text
token). The scoring itself is lib/export/scoring.py (tested without the harness): full forwards, fp32,
greedy generation without a KV cache.
"""

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from .loader import open_model
from .scoring import generate_until, rolling_loglikelihood, score_continuations

MODEL_NAME = "gpt2-ra"
DEFAULT_BATCH_SIZE = 16


@register_model(MODEL_NAME)
class GPT2RALM(TemplateLM):
    def __init__(self, run: str = None, checkpoint: str = "best", device: str = None, batch_size=DEFAULT_BATCH_SIZE,
                 max_gen_toks: int = 256, max_batch_size=None, **unknown):
        super().__init__()
        if not run:
            raise ValueError(f"--model {MODEL_NAME} needs --model_args run=<run or export directory>")
        if unknown:
            raise ValueError(f"--model {MODEL_NAME}: unknown model_args {', '.join(sorted(unknown))}; known: run, "
                             f"checkpoint, device, batch_size, max_gen_toks")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={device}: no CUDA device here; pass device=cpu")
        opened = open_model(run, checkpoint=checkpoint, device=device)
        self.model, self.tokenizer, self.block_size = opened.model, opened.tokenizer, opened.block_size
        self.source = opened.source
        self._device = torch.device(device)
        # "auto" (the harness's probe for the largest batch) is not implemented: a fixed batch is used instead.
        self.batch_size = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    # ---- tokenization (TemplateLM builds requests with these) ----------------------------------
    @property
    def eot_token_id(self):
        return self.tokenizer.eot_token

    @property
    def prefix_token_id(self):
        if self.tokenizer.eot_token is None:
            raise ValueError(f"{self.source}: the {self.tokenizer.name} tokenizer has no end-of-text token, so an "
                             f"empty context (or a rolling log-likelihood) has nothing to condition on")
        return self.tokenizer.eot_token

    @property
    def max_length(self) -> int:
        return self.block_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    # ---- the three request types ----------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """requests: [((context, continuation), context ids, continuation ids)] -> [(logprob, greedy)]."""
        scored = score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests], self.block_size,
                                     self.batch_size)
        for (pair, _, _), result in zip(requests, scored):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return scored

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        out = []
        for request in requests:
            (text,) = request.args
            value = rolling_loglikelihood(self.model, self.tok_encode(text), self.prefix_token_id, self.block_size,
                                          self.batch_size)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
            out.append(value)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        eos = self.tok_decode([self.eot_token_id]) if self.eot_token_id is not None else None
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError(f"{MODEL_NAME} generates greedily only; the task asks for do_sample=True")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            ids = self.tok_encode(context) or ([self.prefix_token_id])
            text = generate_until(self.model, self.tokenizer, ids, until, kwargs["max_gen_toks"], self.block_size)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main() -> None:
    """lm_eval's command line, with "gpt2-ra" registered (this module's import did that)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
