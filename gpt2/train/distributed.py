"""Device selection, torchrun (re)launch, the DistributedDataParallel process group and its wrapper.

One process per GPU, started by torchrun: `python -m lib.runs.train` re-executes itself through
`python -m gpt2.train.torchrun --standalone --nproc_per_node N` (torchrun, with a faster exit) when
CONFIG_TRAIN_NUM_GPUS > 1 and it is not already a torchrun worker. On the CPU the same path runs N gloo processes (tests).

Signals: torchrun runs in its own process group, so a terminal's Ctrl-C or a `kill` reaches it only
through the re-launching process, which forwards SIGINT/SIGTERM to torchrun's group and waits for it.
torchrun passes the signal to its workers, which finish their step, checkpoint and exit (gpt2/train/loop.py).
If the re-launching process is killed outright, the kernel sends torchrun SIGTERM (PR_SET_PDEATHSIG),
so no torchrun is left behind.
"""

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2.io import die_with_parent_hook


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device_type(choice: str) -> str:
    """CONFIG_DEVICE (auto | cuda | cpu) -> "cuda" or "cpu"; cuda without a GPU is an error, not a fallback."""
    if choice == "cpu":
        return "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CONFIG_DEVICE_CUDA=y but torch sees no CUDA GPU; choose DEVICE_AUTO or DEVICE_CPU")
    return "cuda" if torch.cuda.is_available() else "cpu"


def relaunch_command(num_procs: int, entry: list, args: list) -> list:
    """torchrun (gpt2.train.torchrun) with num_procs workers, each running `python <entry> <args>`
    (entry: ["-m", module])."""
    return [sys.executable, "-m", "gpt2.train.torchrun", "--standalone", f"--nproc_per_node={num_procs}",
            *entry, *args]


def relaunch(num_procs: int, entry: list, args: list, device_type: str) -> int:
    """Run `python <entry> <args>` under torchrun with num_procs workers; returns torchrun's exit code.

    A SIGINT/SIGTERM received meanwhile is forwarded to torchrun's process group; once torchrun has
    ended, the return value is then 128 + the signal number (unless torchrun exited 0).
    """
    if device_type == "cuda" and torch.cuda.device_count() < num_procs:
        raise RuntimeError(f"CONFIG_TRAIN_NUM_GPUS={num_procs} but only {torch.cuda.device_count()} GPU(s) "
                           f"are visible")
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
    env.setdefault("OMP_NUM_THREADS", "1" if device_type == "cuda" else str(max(1, (os.cpu_count() or 1) // num_procs)))
    received, child = [], []

    def forward(signum, _frame):
        received.append(signum)
        if child:
            _signal_group(child[0].pid, signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        child.append(subprocess.Popen(relaunch_command(num_procs, entry, args), env=env, process_group=0,
                                      preexec_fn=die_with_parent_hook()))
        if received:  # arrived while torchrun was being started
            _signal_group(child[0].pid, received[0])
        code = child[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received and code != 0 else code


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def setup(device_choice: str) -> DistContext:
    """Join the process group when running under torchrun; pick this process's device."""
    device_type = resolve_device_type(device_choice)
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        return DistContext(rank=0, local_rank=0, world_size=1, device=device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, device=device)


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, reduce_self=()) -> torch.nn.Module:
    """DistributedDataParallel around `model`, leaving out the parameters in `reduce_self`.

    DDP neither broadcasts nor reduces those: they are broadcast from rank 0 here (DDP's start, so every
    rank begins with the same weights), and the caller averages their gradient itself (TrainStep's
    composition_reduce: ra-unified's composition, gpt2/model/attention/hooks.py). Names are the ones DDP
    sees (a compiled model prefixes `_orig_mod.`), found by identity.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    own = {id(p) for p in reduce_self}
    names = [name for name, p in model.named_parameters() if id(p) in own]
    if len(names) != len(own):
        raise ValueError(f"wrap_ddp: {len(own) - len(names)} of the reduce_self parameters are not the wrapped "
                         f"model's (pass the parameters of the model being wrapped)")
    if names:
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)
        with torch.no_grad():
            for p in reduce_self:
                dist.broadcast(p, src=0)
    return DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)


def average_gradients(ctx: DistContext, grads: list) -> list:
    """Each gradient's mean over the processes, sum_r g_r / N as DDP takes it, in one all-reduce of one flat
    buffer. The buffer is float32 at least, so bf16 gradients are summed in float32 (DDP sums fp32 parameter
    gradients); each comes back in its own dtype."""
    if not ctx.enabled or not grads:
        return list(grads)
    dtype = torch.float32
    for g in grads:
        dtype = torch.promote_types(dtype, g.dtype)
    flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    return [part.view_as(g).to(g.dtype) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(ctx: DistContext, value: float) -> float:
    """The largest value across ranks (e.g. elapsed time, so every rank takes the same budget decision)."""
    return value if not ctx.enabled else all_reduce_max_values(ctx, [value])[0]


def all_reduce_max_values(ctx: DistContext, values: list) -> list:
    """Element-wise largest values across ranks, in one collective (e.g. [elapsed time, stop signal])."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    if ctx.enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= ctx.world_size
    return tensor


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    if ctx.enabled:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(ctx: DistContext, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
