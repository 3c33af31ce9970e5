"""What the model's trainer hooks (gpt2/model/gpt.py, class GPT) do for the RA backends.

    GPT.accumulation()     -> cached_composition: ra-unified composes its QKV weights once per optimizer step
    GPT.refresh_routing()  -> RoutingMonitor.refresh: head-selective routing recomputed, changes logged

A trainer reaches them only through those hooks, except under DDP: there it also asks composed_parameters()
which parameters to keep out of DDP's reduction, and passes cached_composition a `reduce` that averages the
composed weights' gradient across processes (gpt2/train/step.py).
"""

import contextlib
import functools

import torch
import torch.nn as nn

from .common import RAAttentionBase
from .compose_ops import compose_every_layer
from .unified import RAUnifiedAttention


def refresh_head_routing(model: nn.Module) -> bool:
    """Recompute head-selective routing in every RA module (call it every few hundred steps under
    torch.compile; eager forwards refresh by themselves). Returns whether any layer changed."""
    changed = False
    for m in model.modules():
        if isinstance(m, RAAttentionBase):
            changed |= m.refresh_head_routing()
    return changed


class RoutingMonitor:
    """Refreshes head-selective routing and says which layers changed since the previous refresh.

    GPT.refresh_routing() is this monitor's refresh. Under torch.compile the routed head set is a guarded
    constant that forwards never update, so the trainer calls it after loading a checkpoint and at every
    evaluation (one small host read per RA layer); a changed set recompiles that layer's graph once.
    Eager forwards refresh by themselves, so changes are tracked against this monitor's own previous
    view, not the modules' state.
    """

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if isinstance(m, RAAttentionBase) and m.head_select_threshold > 0]
        self.plain = {}  # layer -> heads on the plain path at the previous refresh (none before the first)

    def refresh(self) -> list:
        """Recompute routing; one line per layer whose plain-path heads changed."""
        lines = []
        for m in self.modules:
            m.refresh_head_routing()
            ra = range(m.n_head) if m.routed_heads is None else m.routed_heads
            plain = tuple(h for h in range(m.n_head) if h not in ra)
            if plain != self.plain.get(m.layer_idx, ()):
                lines.append(f"routing: layer {m.layer_idx} now {len(plain)}/{m.n_head} heads on the plain path "
                             f"(w_rec < {m.head_select_threshold:g}: heads {list(plain)})")
            self.plain[m.layer_idx] = plain
        return lines


def _compose_layer_by_layer(modules):
    return [m.composed_qkv() for m in modules]


# Without the kernels, one compiled function composes every layer's QKV weight: a handful of fused kernels
# forward and backward instead of ~15 small eager kernels per layer (the launches alone cost more than the
# arithmetic, and would be paid on the host once per optimizer step).
@functools.cache
def _compose_layer_by_layer_compiled():
    return torch.compile(_compose_layer_by_layer, dynamic=False)


def _unified_modules(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, RAUnifiedAttention)]


def _one_launch(modules) -> bool:
    return bool(modules) and all(m.kernels_take(m.c_attn.weight) for m in modules)


def composes_in_one_launch(model: nn.Module) -> bool:
    """Whether cached_composition composes the model's ra-unified layers in one launch each way (the Triton
    kernels run on their weights): then caching pays even with one micro-batch per optimizer step."""
    return _one_launch(_unified_modules(model))


def _compose(modules, compiled: bool, dtype):
    """[(W~, b~ or None)] of every module, in dtype (None: the parameters')."""
    if _one_launch(modules):
        return compose_every_layer([m.kernel_inputs() for m in modules], dtype or modules[0].c_attn.weight.dtype)
    composed = (_compose_layer_by_layer_compiled() if compiled else _compose_layer_by_layer)(modules)
    return [(w.to(dtype), None if b is None else b.to(dtype)) if dtype else (w, b) for w, b in composed]


def composed_parameters(model: nn.Module) -> list:
    """The parameters ra-unified composes its QKV weight from, every layer: c_attn's weight and bias, P, the gate
    roots s_std, s_rec (, u, s_disc with discoverability), the inputs of composed_qkv().

    A forward reads them only through the composed (W~, b~); the only other term that reads one is the w_rec L1
    penalty, which is the same on every process. So under DDP they can be left out of DDP's reduction and
    their gradient averaged through (W~, b~) instead: cached_composition(reduce=...) (gpt2/train/step.py).
    """
    params = []
    for m in model.modules():
        if isinstance(m, RAUnifiedAttention):
            gates = [m.w_std, m.w_rec] + ([m.w_disc] if m.discoverability else [])
            params += [*m.c_attn.parameters(), m.P, *(g.sqrt_weight for g in gates)]
            params += [m.u] if m.discoverability else []
    return params


@contextlib.contextmanager
def cached_composition(model: nn.Module, compiled: bool = False, reduce=None, dtype: torch.dtype | None = None):
    """Compose ra-unified's QKV weights once for all gradient-accumulation micro-steps inside the block.

        with cached_composition(model):
            for micro_step in range(grad_accum):
                loss(model(x)).backward()
        optimizer.step()

    The composed weights are leaves during the block; on exit their accumulated gradient goes back
    through the composition once, for all layers in one backward call. Where the Triton kernels run, every
    layer is composed in one launch each way (compose_ops.compose_every_layer); elsewhere layer by layer,
    through torch.compile when `compiled` (use it when the model itself is compiled).

    `dtype`: the composed weights' dtype (None: the parameters'). With one micro-step, autocast's: the GEMM
    then takes them as they come, and their gradient is the one it computes anyway. With several, keep the
    parameters' dtype, so the micro-steps' gradients accumulate in it.

    `reduce(grads) -> grads` maps the composed weights' accumulated gradients (one list, every layer) before
    they go back: under DDP their mean over the processes. The composition is linear in its output gradient,
    so with G_r the gradient rank r accumulated and J the composition's Jacobian (the same on every rank),
        J^T (1/N sum_r G_r) = 1/N sum_r J^T G_r,
    exactly what DDP gives c_attn, P and the gates when each micro-step composes anew. DDP must then leave
    composed_parameters() alone (gpt2.train.distributed.wrap_ddp): it reduces during the last micro-step's
    backward, before their gradient exists. A block left by an exception sends nothing back (a collective
    on one rank only would hang the others).
    """
    modules = _unified_modules(model)
    if not modules:
        yield
        return
    for m, composed in zip(modules, _compose(modules, compiled, dtype)):
        m.hold_composition(composed)
    try:
        yield
    except BaseException:
        for m in modules:
            m.release_composition()
        raise
    outputs, grads = [], []
    for m in modules:
        for full, grad in m.release_composition():
            outputs.append(full)
            grads.append(grad)
    if outputs:
        torch.autograd.backward(outputs, grads if reduce is None else reduce(grads))
