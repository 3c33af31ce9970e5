"""Evaluation of trained runs: validation loss/perplexity and HellaSwag zero-shot accuracy -> <run>/eval.json.

Modules: hellaswag (the validation file: download, pin, reading, the harness's preprocessing), scoring
(log-likelihood multiple choice: acc, acc_norm, acc_bytes, acc_norm_tokens), evaluation (one run, eval.json).
The names below are the package's interface; `make eval` (scripts/eval.py) and the end-of-run hook
(CONFIG_EVAL_AFTER_TRAIN) call evaluate_run.
"""

from lib.evaluate.evaluation import EVAL_RESULTS_NAME, evaluate_run, newest_run_dir
from lib.evaluate.hellaswag import HellaSwagError, HellaSwagUnavailable

__all__ = ["EVAL_RESULTS_NAME", "HellaSwagError", "HellaSwagUnavailable", "evaluate_run", "newest_run_dir"]
