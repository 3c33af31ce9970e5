"""When the hand-written Triton kernels of the RA family may run.

Triton is optional: it ships with CUDA builds of torch, not with the CPU wheel CI installs. The kernels
run on CUDA tensors; with TRITON_INTERPRET=1 (and triton importable) they also run on CPU tensors
through Triton's interpreter, which is how the CPU tests check them against the torch formulas.
Everywhere else the backends use their plain torch code, which computes the same thing.
"""

import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    triton = tl = None
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_op(name: str, mutates_args=()):
    """torch.library.triton_op where Triton is installed (torch.compile then sees the kernels); elsewhere a plain
    custom_op of the same signature: the kernels never run there, and triton_op would log "Triton not available"
    once per op on every import."""
    if HAVE_TRITON:
        return torch.library.triton_op(name, mutates_args=mutates_args)
    return torch.library.custom_op(name, mutates_args=mutates_args)


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can take tensors on t's device."""
    if not HAVE_TRITON:
        return False
    if t.is_cuda:
        return True
    # Interpreted kernels cannot be traced by torch.compile; compiled CPU code keeps the torch path.
    return INTERPRET and t.device.type == "cpu" and not torch.compiler.is_compiling()


def why_not_triton() -> str:
    """A skip reason for tests of the kernels."""
    if not HAVE_TRITON:
        return "triton is not installed (CPU-only torch); the kernels are checked on the GPU machine"
    return "needs a CUDA device, or TRITON_INTERPRET=1 to run the kernels on CPU"
