"""The hot path: precision, one optimizer step, and evaluation on the fixed validation batches.

No host-device synchronisation happens here: TrainStep returns the loss as a device tensor, and the
loop reads losses back only at its sync points (gpt2/train/loop.py).
"""

from contextlib import nullcontext

import torch

from gpt2.model.gpt import GPT
from gpt2.train import distributed


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """What autocast computes in: bf16/fp16 on CUDA; None (no autocast, float32) otherwise."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return None


def autocast_context(device: torch.device, precision: str):
    """A factory of autocast contexts (autocast_dtype's, or none)."""
    dtype = autocast_dtype(device, precision)
    return nullcontext if dtype is None else (lambda: torch.autocast(device_type="cuda", dtype=dtype))


def caches_composition(raw_model: GPT, grad_accum: int, ddp: bool, composition_reduce, cuda_graphs: bool) -> bool:
    """Whether a step enters the model's accumulation hook (TrainStep's default; the benchmarks' steps ask too):
    under DDP only with its reduction, else with several micro-steps, or with one where the model says it pays
    alone. Not alone under CUDA graphs: composed weights as fresh leaves every step made ra-unified's graphed
    mini step 4.9x slower on an H200 (results/bench/attention-notes.md); in-graph composition is not."""
    return composition_reduce is not None or not ddp and (
        grad_accum > 1 or not cuda_graphs and raw_model.accumulation_pays_alone())


def effective_precision(device: torch.device, precision: str) -> str:
    return precision if device.type == "cuda" else "fp32"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_tf32(device: torch.device) -> None:
    """float32 matmuls and convolutions on CUDA in TF32 (the trainer's and the benchmarks' setting)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class TrainStep:
    """One optimizer step: grad_accum micro-batches of forward/backward, clipping, update, zero_grad.

    `model` is what runs forward (possibly compiled and/or DDP-wrapped); `raw_model` the bare GPT that
    owns the parameters. Returns the mean micro-batch loss as a device tensor (no synchronisation).
    What the model adds to the step comes through its hooks (see GPT): the micro-steps run inside
    `raw_model.accumulation(compiled)`, and `raw_model.regularization_loss()` joins the objective once.

    The accumulation block is entered with grad_accum > 1, and with one micro-step where the model says it pays
    then too (GPT.accumulation_pays_alone: ra-unified composes every layer in one launch each way; its composed
    weights are then held in autocast's dtype, as the GEMM takes them), except under CUDA graphs. Inside it the
    model may
    compute weights derived from its parameters once per optimizer step and send their accumulated gradient
    back to the parameters when the block closes, before clipping. Under DDP that is too late for DDP's own
    reduction, which runs from hooks during the last micro-step's backward; so under DDP the block is entered
    only with `composition_reduce` (distributed.average_gradients), and then always: DDP was built without
    the composed-from parameters (distributed.wrap_ddp with hooks.composed_parameters), and the block
    averages the composed weights' accumulated gradient across processes before sending it back
    (hooks.cached_composition says why that equals DDP's gradients). Every other parameter keeps DDP's
    reduction on the last micro-step (no_sync before it).
    """

    def __init__(self, model, raw_model: GPT, optimizer, *, device: torch.device, precision: str, grad_accum: int,
                 grad_clip: float, ddp: bool = False, cache_composition: bool | None = None,
                 compiled: bool = False, composition_reduce=None, cuda_graphs: bool = False):
        self.model, self.raw_model, self.optimizer = model, raw_model, optimizer
        self.device, self.grad_accum, self.grad_clip, self.ddp = device, grad_accum, grad_clip, ddp
        if cache_composition is None:
            cache_composition = caches_composition(raw_model, grad_accum, ddp, composition_reduce, cuda_graphs)
        if cache_composition and ddp and composition_reduce is None:
            raise ValueError("cached composition under DDP needs composition_reduce (and a DDP built by "
                             "distributed.wrap_ddp); without it, it is single-process only (see TrainStep)")
        if composition_reduce is not None and not cache_composition:
            raise ValueError("composition_reduce needs cache_composition: without it the parameters DDP leaves "
                             "to the step would never be averaged")
        self.composition_reduce = composition_reduce
        self.cache_composition = cache_composition
        self.compiled = compiled  # compose through torch.compile too (the model itself is compiled)
        if cuda_graphs and (grad_accum > 1 or ddp):
            raise ValueError("CUDA graphs need one process and one micro-batch per step: a replay overwrites the "
                             "outputs (gradients) of the one before, which accumulation and DDP would still read")
        self.cuda_graphs = cuda_graphs  # the model was compiled with mode "reduce-overhead"
        self.autocast = autocast_context(device, precision)
        # One micro-step in one process: the composed weights in autocast's dtype (hooks.cached_composition).
        self.composed_dtype = autocast_dtype(device, precision) if grad_accum == 1 and not ddp else None
        fp16 = device.type == "cuda" and precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.params = [p for p in raw_model.parameters() if p.requires_grad]
        self.grad_norm = None  # device tensor of the last step's pre-clip norm (read at log time)

    def to_device(self, x, y):
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x, y

    def __call__(self, batches, inject_nan: bool = False) -> torch.Tensor:
        if self.cuda_graphs:  # a new step: the replay may overwrite what the last one returned (all consumed)
            torch.compiler.cudagraph_mark_step_begin()
        with self.accumulation():
            loss_sum = self.accumulate(batches, inject_nan)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.grad_accum  # a new tensor: under CUDA graphs the graph's own output is overwritten

    def accumulation(self):
        """The block around the micro-steps: the model's accumulation hook, or under DDP the same cached
        composition with the composed weights' gradient averaged across processes before it goes back."""
        if not self.cache_composition:
            return nullcontext()
        return self.raw_model.accumulation(self.compiled, reduce=self.composition_reduce, dtype=self.composed_dtype)

    def accumulate(self, batches, inject_nan: bool) -> torch.Tensor:
        """Forward/backward of every micro-batch; returns the summed loss (device tensor)."""
        loss_sum = None
        for micro in range(self.grad_accum):
            last = micro == self.grad_accum - 1
            x, y = self.to_device(*batches.next())
            # DDP: all-reduce gradients only on the last micro-batch.
            with self.model.no_sync() if self.ddp and not last else nullcontext():
                with self.autocast():
                    _, loss = self.model(x, y, return_logits=False)
                if inject_nan:
                    loss = loss * float("nan")
                objective = loss / self.grad_accum
                regularization = self.raw_model.regularization_loss() if last else None
                if regularization is not None:
                    objective = objective + regularization
                (self.scaler.scale(objective) if self.scaler else objective).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        return loss_sum


@torch.no_grad()
def evaluate(model, raw_model, eval_batches, dctx, autocast, cuda_graphs: bool = False) -> float:
    """Mean loss over the fixed validation batches (split across ranks, then averaged). cuda_graphs: the model
    replays graphs, and each batch is a new step for them (its loss is summed before the next replay)."""
    raw_model.eval()
    mine = eval_batches[dctx.rank::dctx.world_size]
    total = torch.zeros(2, dtype=torch.float64, device=dctx.device)
    for x, y in mine:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast():
            _, loss = model(x, y, return_logits=False)
        total[0] += loss.double()
    total[1] = len(mine)
    total = distributed.all_reduce_sum(dctx, total)
    raw_model.train()
    return float(total[0] / total[1])
