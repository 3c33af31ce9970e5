"""A run's model outside this project: a Hugging Face GPT-2 directory when the model is one, else this project's
own format that `load_exported` reads back exactly; and downstream evaluation of either with
lm-evaluation-harness (lib/export/harness.py, optional: it needs extras/lm-eval.txt).

Modules: kind (which export the settings allow, and why), hf_layout (our tensors in GPT-2's layout),
tokens (the tokenizer of a run or export; GPT-2 BPE as HF tokenizer files), writer (export_run), loader
(load_exported, open_model), scoring (log-likelihoods and greedy generation on token ids), harness (the
lm_eval model "gpt2-ra"). The names below are the package's interface.
"""

from lib.export.kind import composed_settings, hf_blockers
from lib.export.loader import load_exported, open_model, read_export_record
from lib.export.writer import ExportError, Exported, export_run

__all__ = ["ExportError", "Exported", "composed_settings", "export_run", "hf_blockers", "load_exported",
           "open_model", "read_export_record"]
