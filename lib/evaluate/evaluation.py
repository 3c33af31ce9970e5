"""Evaluate one trained run: loss and perplexity on its validation batches, and HellaSwag zero-shot accuracy.

    record = evaluate_run(run_dir)          # also written, atomically, to <run_dir>/eval.json

Validation: the trainer's own evaluation (gpt2.train.step.evaluate) on the trainer's own batches
(gpt2.data.batches.fixed_eval_batches with the run's block size, CONFIG_TRAIN_BATCH_SIZE and
CONFIG_TRAIN_EVAL_BATCHES: evenly spaced windows over the val split, no randomness). So the loss is the one
training logged at the checkpoint's iteration (eval.json puts that logged value beside it), up to torch.compile
and the device's arithmetic. HellaSwag: lib/evaluate/hellaswag.py poses the items, lib/evaluate/scoring.py
scores them. The model runs eagerly in the run's precision (bf16/fp16 autocast on CUDA, float32 on the CPU).
"""

import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gpt2.data import prepare
from gpt2.data.batches import fixed_eval_batches
from gpt2.io import CHECKPOINT_NAME, EVAL_NAME, atomic_write_json, read_jsonl
from gpt2.train.distributed import DistContext
from gpt2.train.metrics import perplexity
from gpt2.train.step import autocast_context, effective_precision, evaluate
from gpt2.train.trained import load_trained
from lib.evaluate.hellaswag import (OFFICIAL_URL, HellaSwagError, HellaSwagUnavailable, official_val_file,
                                    read_items, sha256_of)
from lib.evaluate.scoring import metrics, score_items

EVAL_RESULTS_NAME = "eval.json"  # beside eval.jsonl, the training-time log (gpt2.io.EVAL_NAME)
RECORD_FORMAT = 1
CHANCE = 0.25  # four endings
SCORING = ("lm-evaluation-harness hellaswag task 1.0: zero-shot, query = clean(activity_label: ctx_a Ctx_b), "
           "continuation = ' ' + clean(ending); acc_norm divides by the ending's characters, acc_bytes by its "
           "UTF-8 bytes, acc_norm_tokens by its tokens (llm.c's normalisation); contexts truncated from the left")
DEFAULT_BATCH_SIZE = 32  # sequences per forward pass: 32 x ~100 tokens x 50,304 logits is ~0.6 GB in float32


def evaluate_run(run_dir, settings=None, *, which: str = "best", limit: int | None = None, items_file=None,
                 device=None, batch_size: int = DEFAULT_BATCH_SIZE, log=print) -> dict:
    """Evaluate run_dir's `which` checkpoint ("best" or "last"); write and return the eval.json record.

    device: "cuda" or "cpu"; by default the CPU for a run configured for it (CONFIG_DEVICE_CPU), else the GPU
    when there is one.
    settings: the Settings whose `evaluation` component applies (a matrix cell passes its own); it only
    supplies the HellaSwag item limit when `limit` is None. The model is built from the run's settings.json.
    limit: score the first N HellaSwag items (None or 0: all); the record then says it is partial.
    items_file: score this HellaSwag-format file as it is (tests, other sets) instead of the official
    validation file, which is downloaded once and checked against its pin; the record names which.
    HellaSwag that cannot be scored (the char tokenizer, offline, a corrupt file) is recorded with the reason
    and does not raise; a run without a usable checkpoint raises gpt2.train.checkpoint.CheckpointError.
    """
    run_dir = Path(run_dir)
    if limit is None and settings is not None:
        limit = settings.evaluation.hellaswag_limit
    started = time.perf_counter()
    trained = load_trained(run_dir, which)
    s = trained.settings
    # Where the run trained, unless told: a CPU run stays on the CPU (CPU matrix cells run beside each other);
    # otherwise the GPU when there is one (a cell's own, through CUDA_VISIBLE_DEVICES), else the CPU.
    device = torch.device(device or ("cuda" if s.general.device != "cpu" and torch.cuda.is_available() else "cpu"))
    trained.model.to(device)
    precision = effective_precision(device, s.general.precision)
    autocast = autocast_context(device, precision)
    fell_back = which == "best" and trained.checkpoint.name == CHECKPOINT_NAME
    fallback = " (the run kept no best checkpoint)" if fell_back else ""
    log(f"evaluating {run_dir}: {trained.checkpoint.name}{fallback}, iter {trained.iters}, {device.type}, {precision}")
    data_path = prepare.prepare(s.data)  # the run's data directory (built already; prepare returns it unchanged)
    record = {"format": RECORD_FORMAT, "run_dir": str(run_dir), "checkpoint": trained.checkpoint.name,
              "checkpoint_choice": which, "iters": trained.iters, "device": device.type, "precision": precision,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    record["val"] = validation(trained, data_path, device, autocast, run_dir)
    log(f"val loss {record['val']['loss']:.4f} (ppl {record['val']['ppl']:.2f}) on {record['val']['batches']} "
        f"fixed batches" + logged_note(record["val"]))
    record["hellaswag"] = hellaswag(trained, data_path, device, autocast, limit or None, items_file, batch_size, log)
    record["eval_time_s"] = round(time.perf_counter() - started, 3)
    log(hellaswag_line(record["hellaswag"]))
    atomic_write_json(run_dir / EVAL_RESULTS_NAME, record)
    log(f"wrote {run_dir / EVAL_RESULTS_NAME}")
    return record


def validation(trained, data_path, device, autocast, run_dir) -> dict:
    """The trainer's validation loss of the loaded weights, and what training logged at their iteration."""
    s = trained.settings
    batches = [(x.to(device), y.to(device)) for x, y in
               fixed_eval_batches(data_path, s.model.block_size, s.train.batch_size, s.train.eval_batches)]
    single = DistContext(rank=0, local_rank=0, world_size=1, device=device)
    loss = evaluate(trained.model, trained.model, batches, single, autocast)
    trained.model.eval()  # evaluate() hands the model back in training mode (dropout on)
    logged = [r["val_loss"] for r in read_jsonl(run_dir / EVAL_NAME) if r.get("iter") == trained.iters]
    return {"loss": loss, "ppl": perplexity(loss), "batches": len(batches), "batch_size": s.train.batch_size,
            "block_size": s.model.block_size, "tokens": len(batches) * s.train.batch_size * s.model.block_size,
            "logged_loss": logged[-1] if logged else None}


def logged_note(val: dict) -> str:
    if val["logged_loss"] is None:
        return ""
    return f"; training logged {val['logged_loss']:.4f} at this iteration"


def hellaswag(trained, data_path, device, autocast, limit, items_file, batch_size, log) -> dict:
    """The HellaSwag part of the record: scores, or status "skipped"/"unavailable" with the reason."""
    tokenizer = prepare.load_tokenizer(data_path)
    if tokenizer.name != "gpt2":
        return {"status": "skipped", "reason": f"HellaSwag needs the GPT-2 BPE tokenizer; this run was trained "
                                               f"with the {tokenizer.name} tokenizer"}
    try:
        path = Path(items_file) if items_file else official_val_file()
        every_item = read_items(path)
    except (HellaSwagUnavailable, HellaSwagError) as exc:
        return {"status": "unavailable", "reason": str(exc)}
    items = every_item[:limit] if limit else every_item
    block_size = trained.settings.model.block_size
    total = len(items) * max(len(item.choices) for item in items)
    step = max(1, total // 10)
    shown = [0]

    def progress(done):
        if done - shown[0] >= step and done < total:
            shown[0] = done
            log(f"HellaSwag: {done:,}/{total:,} sequences scored")

    scores = score_items(items, tokenizer.encode, lambda idx: trained.model(idx)[0], block_size, device,
                         batch_size=batch_size, autocast=autocast, progress=progress)
    return {"status": "done", "file": str(path), "official": items_file is None,
            "source": OFFICIAL_URL if items_file is None else None, "sha256": sha256_of(path),
            "items": len(items), "items_in_file": len(every_item), "partial": len(items) < len(every_item),
            **metrics(items, scores), "chance": CHANCE, "block_size": block_size,
            "truncated_items": int(scores.truncated.sum()), "scoring": SCORING}


def hellaswag_line(h: dict) -> str:
    """One line for the console: the scores and how many items, or why there are none."""
    if h["status"] != "done":
        return f"HellaSwag {h['status']}: {h['reason']}"
    scope = (f"PARTIAL: the first {h['items']:,} of {h['items_in_file']:,} items (--limit)" if h["partial"]
             else f"all {h['items']:,} items")
    which = "" if h["official"] else f" of {h['file']} (not the official file)"
    return (f"HellaSwag{which}, {scope}: acc {h['acc']:.4f}, acc_norm {h['acc_norm']:.4f} (chars, as lm-eval), "
            f"acc_norm_tokens {h['acc_norm_tokens']:.4f} (as llm.c), chance {h['chance']:.2f}"
            + (f"; {h['truncated_items']:,} items truncated to the block size" if h["truncated_items"] else ""))


def newest_run_dir(results_dir) -> Path:
    """The run whose checkpoint changed last: single runs (<results>/*/) and matrix cells (*/cells/*/)."""
    results_dir = Path(results_dir)
    checkpoints = [*results_dir.glob("*/ckpt.pt"), *results_dir.glob("*/cells/*/ckpt.pt")]
    if not checkpoints:
        raise FileNotFoundError(f"no run with a checkpoint under {results_dir}; train one (`make train`) or "
                                f"name one with RUN=<dir>")
    return max(checkpoints, key=lambda p: p.stat().st_mtime).parent
