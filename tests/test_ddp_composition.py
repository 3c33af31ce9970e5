"""ra-unified under DDP composes its QKV weight once per optimizer step, with DDP's gradients.

Two real processes (torch.multiprocessing, gloo on the CPU) run one TrainStep of a tiny ra-unified GPT on
different data per rank, twice: as plain DDP (every micro-step composes) and with the composition cached
(DDP leaves the composed-from parameters to the step, which averages the composed weight's gradient). Both
must give every parameter's gradient (as the optimizer sees it, after clipping), the pre-clip norm, the loss
and the updated weights of one process that sees both ranks' micro-batches in turn (grad_accum doubled).
The trainer itself runs through its torchrun relaunch (CONFIG_TRAIN_NUM_GPUS=2) and must end where a
single process with the same global batch ends.
"""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt2.model.attention.hooks import cached_composition, composed_parameters
from gpt2.model.attention.unified import RAUnifiedAttention
from gpt2.model.gpt import GPT
from gpt2.train import distributed, trainer
from gpt2.train.step import TrainStep
from lib.config import load_settings
from test_attention_helpers import attn_settings, kv_settings, mlp_settings, model_settings, randomize

REPO = Path(__file__).resolve().parent.parent

WORLD, VOCAB, BATCH, BLOCK, LAYERS = 2, 50, 2, 8, 2
# name -> (dtype, grad_accum per rank, discoverability, c_attn bias, w_rec L1, routing threshold, grad clip)
CASES = {
    "fp64-accum2": (torch.float64, 2, False, True, 0.0, 0.0, 0.0),
    "fp64-accum3-disc-l1-routed-clipped": (torch.float64, 3, True, True, 0.01, 0.2, 0.05),
    "fp32-accum4-disc-nobias": (torch.float32, 4, True, False, 0.0, 0.0, 1.0),
}


def build(case):
    dtype, _, disc, bias, l1, threshold, _ = CASES[case]
    model = GPT(model_settings(n_embd=16, n_head=2, n_layer=LAYERS, block_size=BLOCK, bias=bias),
                attn_settings("ra-unified", rank=2, disc=disc, l1=l1, threshold=threshold), mlp_settings(),
                kv_settings(), VOCAB, seed=0)
    for block in model.transformer.h:
        randomize(block.attn, seed=1 + block.attn.layer_idx, shared=False)  # gates, P, u off their init
        if threshold > 0:
            with torch.no_grad():
                block.attn.w_rec.sqrt_weight[0] = 0.3  # w_rec = 0.09 < threshold: head 0 routed off
    return model.to(dtype)


def micro_batches(case, rank):
    """This rank's micro-batches (different data on every rank)."""
    g = torch.Generator().manual_seed(1000 * rank + len(case))
    return [(torch.randint(VOCAB, (BATCH, BLOCK), generator=g), torch.randint(VOCAB, (BATCH, BLOCK), generator=g))
            for _ in range(CASES[case][1])]


class Batches:
    def __init__(self, batches):
        self.batches = iter(batches)

    def next(self):
        return next(self.batches)


def one_step(case, model, forward, batches, grad_accum, **step_kwargs):
    """One TrainStep; -> loss, pre-clip norm, gradients as the optimizer saw them, weights after, compositions."""
    names = {p: n for n, p in model.named_parameters()}
    # SGD: the update is linear in the gradient, so a gradient's rounding stays rounding in the weights (AdamW's
    # normalised step turns a 1e-9 difference in a 1e-7 gradient entry into 1e-6); a weight moves iff it has one.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {}
    optimizer.register_step_pre_hook(lambda *_: seen.update({names[p]: p.grad.clone() for p in names}))
    step = TrainStep(forward, model, optimizer, device=torch.device("cpu"), precision="fp32", grad_accum=grad_accum,
                     grad_clip=CASES[case][6], **step_kwargs)
    calls = []
    compose = RAUnifiedAttention.composed_qkv
    RAUnifiedAttention.composed_qkv = lambda self: calls.append(1) or compose(self)
    try:
        loss = step(Batches(batches))
    finally:
        RAUnifiedAttention.composed_qkv = compose
    return {"loss": loss, "grad_norm": step.grad_norm, "grads": seen, "cached": step.cache_composition,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}, "compositions": len(calls),
            "routing": model.refresh_routing()}


def worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    dctx = distributed.DistContext(rank=rank, local_rank=rank, world_size=WORLD, device=torch.device("cpu"))
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for case in CASES:
        accum, batches = CASES[case][1], micro_batches(case, rank)
        plain = build(case)  # the trainer before: DDP reduces everything, every micro-step composes
        results[case, "plain"] = one_step(case, plain, DDP(plain), batches, accum, ddp=True)
        cached = build(case)
        wrapped = distributed.wrap_ddp(cached, dctx, reduce_self=composed_parameters(cached))
        results[case, "cached"] = one_step(case, cached, wrapped, batches, accum, ddp=True,
                                           composition_reduce=functools.partial(distributed.average_gradients, dctx))
        results[case, "ignored"] = sorted(wrapped.parameters_to_ignore)
    # wrap_ddp starts every rank from rank 0's values of the parameters DDP leaves out
    model = build("fp64-accum2")
    with torch.no_grad():
        for p in composed_parameters(model):
            p.add_(rank)
    distributed.wrap_ddp(model, dctx, reduce_self=composed_parameters(model))
    results["broadcast"] = [p.detach().clone() for p in composed_parameters(model)]
    # the gradients are averaged in float32 at least and come back in their own dtype
    grads = [torch.full((3,), 1.0 + rank, dtype=torch.bfloat16),
             torch.full((2, 2), 0.1 * (rank + 1), dtype=torch.float64)]
    results["averaged"] = distributed.average_gradients(dctx, grads)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def compiled_worker(rank, init_file, out_dir):
    """The trainer's compiled form: DDP around torch.compile(model), composition compiled too."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    dctx = distributed.DistContext(rank=rank, local_rank=rank, world_size=WORLD, device=torch.device("cpu"))
    case = "fp32-accum4-disc-nobias"
    model = build(case)
    wrapped = distributed.wrap_ddp(torch.compile(model), dctx, reduce_self=composed_parameters(model))
    result = one_step(case, model, wrapped, micro_batches(case, rank), CASES[case][1], ddp=True, compiled=True,
                      composition_reduce=functools.partial(distributed.average_gradients, dctx))
    result["ignored"] = sorted(wrapped.parameters_to_ignore)
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def single_process(case):
    """One process, both ranks' micro-batches in turn: grad_accum doubled, the same mean gradient."""
    model = build(case)
    batches = [b for rank in range(WORLD) for b in micro_batches(case, rank)]
    return one_step(case, model, model, batches, WORLD * CASES[case][1], cache_composition=False)


def assert_same(a, b, dtype, what):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=f"{what} {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_cached_composition_under_ddp_gives_ddps_gradients(ranks, case):
    dtype, accum = CASES[case][0], CASES[case][1]
    single = single_process(case)
    for rank in ranks:
        plain, cached = rank[case, "plain"], rank[case, "cached"]
        assert not plain["cached"] and cached["cached"]
        for run in (plain, cached):
            assert_same(run["grads"], single["grads"], dtype, "gradient")
            assert_same(run["params"], single["params"], dtype, "updated")
            if CASES[case][6] > 0:  # clipping saw the final gradients
                torch.testing.assert_close(run["grad_norm"], single["grad_norm"])
    # the loss each rank returns is its own micro-batches' mean; their mean is the single process's
    torch.testing.assert_close(sum(r[case, "cached"]["loss"] for r in ranks) / WORLD, single["loss"])
    # every rank holds the same weights after the step, bit for bit
    for name, value in ranks[0][case, "cached"]["params"].items():
        assert torch.equal(value, ranks[1][case, "cached"]["params"][name]), name
    # composed once per layer for the whole step, not once per micro-step
    assert all(r[case, "cached"]["compositions"] == LAYERS for r in ranks)
    assert all(r[case, "plain"]["compositions"] == LAYERS * accum for r in ranks)


def test_compiled_model_under_ddp_caches_the_composition_too(tmp_path):
    mp.spawn(compiled_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    case = "fp32-accum4-disc-nobias"
    single = single_process(case)
    fresh = build(case)
    names = {p: n for n, p in fresh.named_parameters()}
    for rank in range(WORLD):
        run = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert run["cached"] and run["compositions"] == LAYERS
        assert run["ignored"] == sorted(f"_orig_mod.{names[p]}" for p in composed_parameters(fresh))
        assert_same(run["grads"], single["grads"], torch.float32, "gradient")
        assert_same(run["params"], single["params"], torch.float32, "updated")


def test_composition_really_moved_c_attn_p_and_the_gates(ranks):
    case = "fp64-accum3-disc-l1-routed-clipped"
    before = dict(build(case).named_parameters())
    after = ranks[0][case, "cached"]["params"]
    moved = [n for n in after if n.endswith((".P", ".u", "sqrt_weight", "c_attn.weight", "c_attn.bias"))
             and ".attn." in n and not torch.equal(after[n], before[n])]
    assert len(moved) == LAYERS * 7  # c_attn weight and bias, P, u, the three gate roots of every layer
    # routing still follows the gates: head 0 (w_rec below the threshold) is on the plain path in every layer
    assert all(r[case, "cached"]["routing"] == r[case, "plain"]["routing"] for r in ranks)
    assert [line.endswith("heads [0])") for line in ranks[0][case, "cached"]["routing"]] == [True] * LAYERS


def test_wrap_ddp_leaves_out_exactly_the_composed_parameters_and_broadcasts_them(ranks):
    model = build("fp64-accum2")
    names = {p: n for n, p in model.named_parameters()}
    assert ranks[0]["fp64-accum2", "ignored"] == sorted(names[p] for p in composed_parameters(model))
    for theirs, mine in zip(ranks[1]["broadcast"], ranks[0]["broadcast"]):
        assert torch.equal(theirs, mine)  # rank 1 had added 1 to every value before the wrap


def test_average_gradients_is_the_mean_in_each_gradients_dtype(ranks):
    for rank in ranks:
        bf16, fp64 = rank["averaged"]
        assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, torch.full((3,), 1.5, dtype=torch.bfloat16))
        assert fp64.dtype == torch.float64
        torch.testing.assert_close(fp64, torch.full((2, 2), 0.15, dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("disc, bias", [(False, True), (True, False), (True, True)])
def test_composed_parameters_are_what_the_composition_reads_and_nothing_else_reads(disc, bias):
    """DDP may leave them out only if a forward under the cache gives them no gradient and every other
    parameter one (find_unused_parameters=False), and if they are exactly the composition's inputs."""
    model = GPT(model_settings(n_embd=16, n_head=2, n_layer=LAYERS, block_size=BLOCK, bias=bias),
                attn_settings("ra-unified", rank=2, disc=disc), mlp_settings(), kv_settings(), VOCAB, seed=0)
    composed = {id(p) for p in composed_parameters(model)}
    for m in model.attention_modules():
        params = list(m.parameters())
        weight, bias_out = m.composed_qkv()
        total = weight.sum() + (0 if bias_out is None else bias_out.sum())
        reached = torch.autograd.grad(total, params, allow_unused=True)
        assert {id(p) for p, g in zip(params, reached) if g is not None} == {id(p) for p in params} & composed
    x = torch.randint(VOCAB, (BATCH, BLOCK))
    with cached_composition(model):
        model(x, x)[1].backward()
        got = {id(p) for p in model.parameters() if p.grad is not None}
        assert got == {id(p) for p in model.parameters()} - composed
    assert all(p.grad is not None for p in model.parameters())  # sent back through the composition on exit


def test_train_step_refuses_a_ddp_cache_without_its_reduction():
    model = torch.nn.Linear(2, 2)
    make = functools.partial(TrainStep, model, model, None, device=torch.device("cpu"), precision="fp32",
                             grad_clip=0.0)
    reduce = lambda grads: grads  # noqa: E731
    assert make(grad_accum=1, ddp=True, composition_reduce=reduce).cache_composition  # DDP left them to the step
    with pytest.raises(ValueError, match="composition_reduce needs cache_composition"):
        make(grad_accum=4, ddp=True, composition_reduce=reduce, cache_composition=False)
    with pytest.raises(ValueError, match="needs composition_reduce"):
        make(grad_accum=4, ddp=True, cache_composition=True)


def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_trainer_relaunched_on_two_processes_ends_where_one_process_does(make_config, tmp_path):
    """CONFIG_TRAIN_NUM_GPUS=2 (torchrun, gloo), 2 micro-steps per rank of batch 4, against one process with
    2 micro-steps of batch 8: rank r's micro-batch k is the r-th half of the single process's (BatchSource
    deals windows round-robin), so each step's mean gradient is the same."""
    common = {"ATTN_BACKEND_RA_UNIFIED": "y", "ATTN_DISCOVERABILITY": "y", "ATTN_W_REC_L1": "0.001",
              "TRAIN_MAX_ITERS": "3", "TRAIN_EVAL_INTERVAL": "3", "TRAIN_CHECKPOINT_INTERVAL": "3"}
    two = make_config({**common, "TRAIN_NUM_GPUS": "2", "TRAIN_GRAD_ACCUM": "4", "TRAIN_BATCH_SIZE": "4"},
                      name="two.config")
    one = make_config({**common, "TRAIN_GRAD_ACCUM": "2", "TRAIN_BATCH_SIZE": "8"}, name="one.config")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2_")}  # the config's budget, not a caller's
    proc = subprocess.run([sys.executable, "-m", "lib.runs.train", "--config", str(two), "--run-dir",
                           str(tmp_path / "two")], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert metrics(tmp_path / "two")["world_size"] == 2
    assert trainer.run(load_settings(one, environ={}), one, tmp_path / "one", argv=["tests"]) == 0
    m_two, m_one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert m_two["status"] == m_one["status"] == "done" and m_two["iters"] == m_one["iters"] == 3
    assert m_two["tokens_seen"] == m_one["tokens_seen"]
    weights = [torch.load(tmp_path / run / "ckpt.pt", weights_only=False)["model"] for run in ("two", "one")]
    assert weights[0].keys() == weights[1].keys()
    # AdamW's normalised update turns the rounding of a differently ordered sum into ~1e-6 (seen: 1.7e-6) after
    # 3 steps; a gradient averaged wrongly (or a rank drifting apart) moves a weight by O(lr) = 1e-3 per step.
    for name in weights[1]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-5, msg=name)
    logged = [re.findall(r"iter \d+ \| loss \S+ \| lr \S+ \| grad norm \S+", (tmp_path / run / "train.log").read_text())
              for run in ("two", "one")]
    assert len(logged[0]) == 2 and logged[0] == logged[1]  # the same losses and pre-clip norms (iters 1 and 3)
