"""The trainer end to end on tiny CPU runs: run directory, budget, reproducibility, failure, quality, DDP."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2.train import trainer as train
from gpt2.train.budget import Budget, BudgetClock, Progress
from gpt2.train.machine import MachineLoad, busy_verdict, other_gpu_processes
from lib.config import load_settings
from gpt2.io import read_jsonl

REPO = Path(__file__).resolve().parent.parent

METRIC_KEYS = {"status", "failure_reason", "iters", "tokens_seen", "tokens_per_s", "ms_per_step", "mfu", "params",
               "final_val_loss", "best_val_loss", "final_val_ppl", "unigram_entropy", "peak_mem_bytes",
               "train_time_s", "eval_time_s", "compile_time_s", "gates", "best_val_iter", "best_val_tokens",
               "past_val_minimum", "machine"}
MACHINE_KEYS = {"cpus", "load_avg_max", "load_avg_mean", "gpu_other_processes", "busy", "busy_reason"}
EVAL_KEYS = {"iter", "tokens", "train_time_s", "wall_time_s", "train_loss", "val_loss", "val_ppl", "lr"}


def clean_env():
    """The test's own budget, not one a caller exported (GPT2_MAX_TIME=600 make test)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GPT2_")}


def train_in_process(config, run_dir, resume=False, environ=None):
    settings = load_settings(config, environ=environ or {})
    return train.run(settings, config, run_dir, resume=resume, argv=["tests"])


def metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def step_losses(run_dir):
    return [float(m) for m in re.findall(r"^\S+ \S+ iter \d+ \| loss (\S+)", (Path(run_dir) / "train.log").read_text(),
                                         re.M)]


def start_script(config, run_dir, resume=False, env=None):
    command = [sys.executable, "-m", "lib.runs.train", "--config", str(config), "--run-dir", str(run_dir)]
    return subprocess.Popen(command + (["--resume"] if resume else []), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env or clean_env())


def signal_after_first_eval(proc, run_dir, signum, timeout_s=120):
    """Send `signum` once eval.jsonl has a record; returns (exit code, console output)."""
    deadline = time.monotonic() + timeout_s
    while not read_jsonl(run_dir / "eval.jsonl"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def processes_mentioning(text: str) -> list:
    """Command lines of live processes that contain `text` (e.g. a run directory: orphaned workers)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(text in arg for arg in args):
            found.append(" ".join(args))
    return found


def test_budget_fraction_and_stop():
    b = Budget(max_time_s=10, max_iters=100)
    assert b.fraction(5, 10) == 0.5 and b.fraction(1, 60) == 0.6 and b.fraction(50, 0) == 1.0
    assert b.stop_reason(9.9, 99) is None and b.stop_reason(10, 1) == "max_time" and b.stop_reason(0, 100) == "max_iters"
    assert Budget(0, 10).fraction(1e9, 5) == 0.5
    # The next time check lands about when the time runs out (faster estimate), at least every log interval.
    assert Budget(10, 0).next_check(5, 9.0, step_time_s=0.5, mean_step_s=0.4, log_interval=10) == 8
    assert Budget(10, 0).next_check(5, 0.0, step_time_s=0.5, mean_step_s=0.5, log_interval=10) == 15
    assert Budget(10, 0).next_check(5, 0.0, step_time_s=None, mean_step_s=0.0, log_interval=10) == 6
    assert Budget(0, 100).next_check(5, 0.0, step_time_s=0.5, mean_step_s=0.5, log_interval=10) == 15
    with pytest.raises(ValueError, match="no budget"):
        Budget(0, 0)


def test_busy_verdict_thresholds():
    """CPU runs: busy once the 1-minute load exceeds the usable cores; GPU runs: busy with any other process."""
    assert busy_verdict("cpu", 2, 2.48, None) == (True, "1-minute load average reached 2.48 on 2 usable core(s)")
    assert busy_verdict("cpu", 2, 2.0, None) == (False, None)  # a lone run keeps its own cores busy
    assert busy_verdict("cpu", 16, 9.5, None) == (False, None)
    assert busy_verdict("cpu", 2, None, None) == (False, None)  # no load average on this platform
    assert busy_verdict("cuda", 16, 40.0, 0) == (False, None)  # a GPU run is not judged by the host's load
    assert busy_verdict("cuda", 16, 0.3, 2) == (True, "2 other process(es) on the GPU")
    assert busy_verdict("cuda", 16, 0.3, None) == (False, None)  # unknown is not busy


def test_the_gpu_listing_runs_beside_the_loop_and_is_read_at_the_next_sample(tmp_path, monkeypatch):
    from gpt2.train import machine

    # A stand-in nvidia-smi that takes 0.5 s and lists this process and one other on GPU-abc.
    (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\nsleep 0.5\necho '{os.getpid()}, GPU-abc'\necho '1, GPU-abc'\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(machine, "start_gpu_probe", lambda device: machine.GpuNeighbours("abc"))
    load = MachineLoad()
    t0 = time.perf_counter()
    load.sample("a device")
    load.sample("a device")  # the first listing has not finished: not waited for, and no second one starts
    assert time.perf_counter() - t0 < 0.3 and load.gpu_other_processes is None
    time.sleep(0.7)
    load.sample("a device")  # read now, and the next one started
    assert load.gpu_other_processes == 1 and load._probe is not None
    load.finish()
    assert load.gpu_other_processes == 1 and load._probe is None
    assert MachineLoad(**load.state()) == load


def test_machine_load_samples_the_real_load_average():
    load = MachineLoad()
    before = os.getloadavg()[0]
    load.sample()
    load.sample(torch_cpu())  # a device: also the GPU's neighbours, none for the CPU
    after = os.getloadavg()[0]
    record = load.record("cpu")
    assert load.load_samples == 2 and record["cpus"] == len(os.sched_getaffinity(0)) >= 1
    assert min(before, after) - 0.5 <= record["load_avg_max"] <= max(before, after) + 0.5
    assert record["load_avg_mean"] <= record["load_avg_max"] and record["gpu_other_processes"] is None
    assert (record["busy"], record["busy_reason"]) == busy_verdict("cpu", record["cpus"], record["load_avg_max"], None)
    assert MachineLoad(**load.state()) == load  # what a checkpoint carries gives the same samples back


def test_other_gpu_processes_from_nvidia_smi_lines():
    listing = ("4242, GPU-5a1c2e34-0d6b-11ef-9d52-2b1e3f4a5b6c\n"
               "5151, GPU-5a1c2e34-0d6b-11ef-9d52-2b1e3f4a5b6c\n"
               "6060, GPU-77777777-0d6b-11ef-9d52-2b1e3f4a5b6c\n")
    ours = "5a1c2e34-0d6b-11ef-9d52-2b1e3f4a5b6c"  # torch's uuid has no "GPU-"
    assert other_gpu_processes(listing, ours, own_pid=4242) == 1
    assert other_gpu_processes(listing, "GPU-" + ours.upper(), own_pid=4242) == 1
    assert other_gpu_processes(listing, ours, own_pid=99) == 1  # PIDs of another namespace: one of them is us
    assert other_gpu_processes(listing, "77777777-0d6b-11ef-9d52-2b1e3f4a5b6c", own_pid=6060) == 0
    assert other_gpu_processes("", ours, own_pid=4242) is None  # we hold a context there: hidden, not zero
    assert other_gpu_processes("No running processes found\n", ours, own_pid=4242) is None


def torch_cpu():
    import torch

    return torch.device("cpu")


def test_budget_clock_charges_agreed_chunks_and_extrapolates_the_lr_fraction():
    syncs = []
    clock = BudgetClock(Budget(max_time_s=10, max_iters=0), iters=0, sync=lambda: syncs.append(1))
    p = Progress(iters=2, train_time_s=0.0)  # two warm-up steps: charged to compile time, not here
    assert clock.check_due(1) and clock.chunk_elapsed_s() == 0.0 and not syncs  # an empty chunk needs no sync
    assert clock.fraction_after_next_step(p) == 0.0  # no step time measured yet
    clock.open_chunk()
    for _ in range(4):
        clock.count_step()
    assert clock.chunk_elapsed_s() >= 0.0 and syncs == [1]
    clock.close_chunk(2.0, p, tokens_per_iter=100)  # the time all ranks agreed on
    assert (p.train_time_s, p.timed_iters, p.timed_tokens, clock.step_time_s) == (2.0, 4, 400, 0.5)
    clock.count_step()  # one step into the next chunk: the coming one ends at 2 + 2 x 0.5 s
    assert clock.fraction_after_next_step(p) == pytest.approx(0.3)
    clock.plan_next_check(p, log_interval=100)
    assert clock.next_check == 2 + 16  # 8 s left at 0.5 s per step


def test_script_writes_self_describing_run_dir(make_config, tmp_path):
    config = make_config()
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lib.runs.train", "--config", str(config), "--run-dir", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("config", "env.json", "train.log", "eval.jsonl", "metrics.json", "ckpt.pt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "config").read_text() == config.read_text()
    m = metrics(run_dir)
    assert METRIC_KEYS <= set(m)
    assert m["status"] == "done" and m["failure_reason"] is None and m["iters"] == 20
    assert m["tokens_seen"] == 20 * 4 * 32 and m["params"] > 0 and m["tokens_per_s"] > 0
    assert m["mfu"] is None and m["peak_mem_bytes"] is None  # CPU
    machine = m["machine"]
    assert set(machine) == MACHINE_KEYS and machine["cpus"] == len(os.sched_getaffinity(0))
    assert machine["gpu_other_processes"] is None  # CPU: no GPU to share
    assert 0 <= machine["load_avg_mean"] <= machine["load_avg_max"]  # sampled at the log and eval points
    assert (machine["busy"], machine["busy_reason"]) == busy_verdict("cpu", machine["cpus"], machine["load_avg_max"],
                                                                     None)
    assert m["gates"] == [] and m["final_val_ppl"] == pytest.approx(2.718281828 ** m["final_val_loss"])
    records = read_jsonl(run_dir / "eval.jsonl")
    assert [r["iter"] for r in records] == [10, 20] and all(EVAL_KEYS <= set(r) for r in records)
    assert records[-1]["val_loss"] == m["final_val_loss"]
    env = json.loads((run_dir / "env.json").read_text())
    assert {"commit", "diff", "untracked"} <= set(env["git"]) and env["torch"] and env["host"]
    assert "lib.runs.train" in env["command"]
    log = (run_dir / "train.log").read_text()
    assert "float32" in log and "unigram entropy" in log and "final val loss" in proc.stdout
    # A second start in the same directory without --resume is refused and leaves the run alone.
    again = subprocess.run([sys.executable, "-m", "lib.runs.train", "--config", str(config), "--run-dir", str(run_dir)],
                           cwd=REPO, capture_output=True, text=True, timeout=300, env=clean_env())
    assert again.returncode != 0 and "--resume" in again.stderr
    assert metrics(run_dir)["status"] == "done"


def test_same_seed_same_curve(make_config, tmp_path):
    over = {"TRAIN_MAX_ITERS": "12", "TRAIN_LOG_INTERVAL": "1", "TRAIN_EVAL_INTERVAL": "6",
            "TRAIN_CHECKPOINT_INTERVAL": "0", "MODEL_DROPOUT": "0.1"}
    config = make_config(over)
    for name in ("a", "b"):
        assert train_in_process(config, tmp_path / name) == 0
    other = make_config({**over, "SEED": "7"}, name="seed7")
    assert train_in_process(other, tmp_path / "c") == 0
    a, b, c = (step_losses(tmp_path / n) for n in "abc")
    assert len(a) == 12 and a == b and a != c
    strip = lambda rs: [{k: r[k] for k in ("iter", "train_loss", "val_loss", "lr")} for r in rs]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "a" / "eval.jsonl")) == strip(read_jsonl(tmp_path / "b" / "eval.jsonl"))


def test_nan_loss_fails_the_run(make_config, tmp_path):
    config = make_config({"DEBUG_INJECT_NAN_AT_ITER": "7", "TRAIN_CHECKPOINT_INTERVAL": "0"})
    assert train_in_process(config, tmp_path / "run") == 1
    m = metrics(tmp_path / "run")
    assert m["status"] == "failed" and "non-finite training loss" in m["failure_reason"]
    assert "iter 7" in m["failure_reason"] and m["iters"] <= 10
    assert not (tmp_path / "run" / "ckpt.pt").exists()  # a poisoned model is never checkpointed


def test_time_budget_env_override_and_schedule(make_config, tmp_path):
    config = make_config({"TRAIN_MAX_ITERS": "0", "GPT2_MAX_TIME": "100", "TRAIN_EVAL_INTERVAL": "25",
                          "TRAIN_LOG_INTERVAL": "10", "TRAIN_CHECKPOINT_INTERVAL": "0"})
    assert train_in_process(config, tmp_path / "run", environ={"GPT2_MAX_TIME": "2"}) == 0
    m = metrics(tmp_path / "run")
    assert m["stop_reason"] == "max_time" and m["budget"]["max_time_s"] == 2
    # The loop checks the clock on a schedule planned from the step time, so it may overshoot by
    # about a step; the bound scales with the measured step time so a loaded machine does not flake.
    overshoot_s = max(1.0, 4 * m["ms_per_step"] / 1000)
    assert 2.0 <= m["train_time_s"] < 2.0 + overshoot_s, (m["train_time_s"], m["ms_per_step"])
    assert m["budget"]["overshoot_s"] == pytest.approx(m["train_time_s"] - 2.0)  # reported, not hidden
    assert m["epochs"] == pytest.approx(m["tokens_seen"] / m["train_tokens"])  # passes over the training split
    assert m["eval_time_s"] > 0 and m["compile_time_s"] > 0  # timed, never charged
    settings = load_settings(config, environ={})
    lr_min, lr = settings.train.lr_min, settings.train.lr
    last = read_jsonl(tmp_path / "run" / "eval.jsonl")[-1]
    assert last["lr"] <= lr_min + 0.05 * (lr - lr_min)  # the decay completed within the time budget


def test_resume_spends_only_the_remaining_budget(make_config, tmp_path):
    config = make_config({"TRAIN_MAX_ITERS": "10", "TRAIN_EVAL_INTERVAL": "5", "TRAIN_CHECKPOINT_INTERVAL": "0"})
    run_dir = tmp_path / "run"
    assert train_in_process(config, run_dir) == 0
    first = metrics(run_dir)
    assert train_in_process(config, run_dir, resume=True) == 0  # budget already spent: nothing more
    assert metrics(run_dir)["iters"] == 10
    assert train_in_process(config, run_dir, resume=True, environ={"GPT2_MAX_ITERS": "16"}) == 0
    m = metrics(run_dir)
    assert m["iters"] == 16 and m["sessions"] == 3 and m["tokens_seen"] == 16 * 4 * 32
    assert m["train_time_s"] > first["train_time_s"]
    assert [r["iter"] for r in read_jsonl(run_dir / "eval.jsonl")] == [5, 10, 15, 16]
    assert "resuming at iter 10" in (run_dir / "train.log").read_text()


def test_short_run_beats_unigram_entropy(make_config, tmp_path):
    config = make_config({"TRAIN_MAX_ITERS": "150", "MODEL_BLOCK_SIZE": "64", "TRAIN_BATCH_SIZE": "8",
                          "TRAIN_LR": "3e-3", "TRAIN_LR_MIN": "3e-4", "TRAIN_EVAL_INTERVAL": "150",
                          "TRAIN_LOG_INTERVAL": "50", "TRAIN_EVAL_BATCHES": "8", "TRAIN_CHECKPOINT_INTERVAL": "0"})
    assert train_in_process(config, tmp_path / "run") == 0
    m = metrics(tmp_path / "run")
    assert m["unigram_entropy"] > 3.0  # characters of English text
    assert m["final_val_loss"] < m["unigram_entropy"] - 0.3, m


def test_two_process_ddp_on_cpu(make_config, tmp_path):
    config = make_config({"TRAIN_NUM_GPUS": "2", "TRAIN_GRAD_ACCUM": "2", "TRAIN_MAX_ITERS": "6",
                          "TRAIN_EVAL_INTERVAL": "3", "TRAIN_CHECKPOINT_INTERVAL": "3"})
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lib.runs.train", "--config", str(config), "--run-dir", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = metrics(run_dir)
    assert m["status"] == "done" and m["world_size"] == 2 and m["iters"] == 6
    assert m["tokens_seen"] == 6 * 4 * 2 * 32  # global batch kept: batch x grad_accum x block
    import torch

    state = torch.load(run_dir / "ckpt.pt", weights_only=False)
    assert len(state["ranks"]) == 2 and state["ranks"][1]["data"]["rank"] == 1


def test_sigterm_checkpoints_and_resume_goes_on(make_config, tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, exit 143, and --resume continues from it."""
    config = make_config({"TRAIN_MAX_ITERS": "1000000", "TRAIN_EVAL_INTERVAL": "5", "TRAIN_LOG_INTERVAL": "5",
                          "TRAIN_CHECKPOINT_INTERVAL": "0"})
    run_dir = tmp_path / "run"
    code, out = signal_after_first_eval(start_script(config, run_dir), run_dir, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    m = metrics(run_dir)
    assert m["status"] == "interrupted" and m["stop_reason"] == "signal" and m["failure_reason"] is None
    import torch

    progress = torch.load(run_dir / "ckpt.pt", weights_only=False)["progress"]
    assert progress["iters"] >= 5 and progress["iters"] == m["iters"] and progress["train_time_s"] > 0
    assert "interrupted by SIGTERM" in (run_dir / "train.log").read_text()
    # --resume (in this process, to spare a second torch start-up) goes on from the checkpoint; the budget
    # is cut to a few more steps so that it ends.
    more = progress["iters"] + 3
    assert train_in_process(config, run_dir, resume=True, environ={"GPT2_MAX_ITERS": str(more)}) == 0
    m = metrics(run_dir)
    assert m["status"] == "done" and m["iters"] == more and m["sessions"] == 2 and m["stop_reason"] == "max_iters"
    assert f"resuming at iter {progress['iters']}" in (run_dir / "train.log").read_text()


def test_signal_before_training_stops_at_once(make_config, tmp_path, monkeypatch):
    """Before the first step there is nothing to checkpoint: the run ends at once, interrupted, handlers restored."""
    handler_before = signal.getsignal(signal.SIGTERM)
    real_build = train.build_model

    def build_then_signal(*args, **kwargs):
        model = real_build(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return model

    monkeypatch.setattr(train, "build_model", build_then_signal)
    assert train_in_process(make_config(), tmp_path / "run") == 128 + signal.SIGTERM
    m = metrics(tmp_path / "run")
    assert m["status"] == "interrupted" and m["stop_reason"] == "signal" and m["iters"] == 0
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_sigint_to_the_launcher_stops_every_ddp_rank(make_config, tmp_path):
    """Ctrl-C to the process that re-launched itself under torchrun: forwarded, all ranks stop, nothing left."""
    config = make_config({"TRAIN_NUM_GPUS": "2", "TRAIN_GRAD_ACCUM": "2", "TRAIN_MAX_ITERS": "1000000",
                          "TRAIN_EVAL_INTERVAL": "4", "TRAIN_LOG_INTERVAL": "4", "TRAIN_CHECKPOINT_INTERVAL": "0"})
    run_dir = tmp_path / "run"
    code, out = signal_after_first_eval(start_script(config, run_dir), run_dir, signal.SIGINT)
    assert code == 128 + signal.SIGINT, out[-3000:]
    m = metrics(run_dir)
    assert m["status"] == "interrupted" and m["world_size"] == 2 and m["iters"] >= 4
    import torch

    state = torch.load(run_dir / "ckpt.pt", weights_only=False)
    assert state["progress"]["iters"] == m["iters"] and len(state["ranks"]) == 2
    assert processes_mentioning(str(run_dir)) == []  # no torchrun or worker outlived the launcher


def test_bench_smoke_writes_reports(tmp_path):
    from bench import train as bench
    assert bench.main(["--smoke", "--out-dir", str(tmp_path), "--steps", "2", "--repeats", "1"]) == 0
    report = json.loads((tmp_path / "train-cpu-smoke.json").read_text())
    assert report["ours"]["tokens_per_s"] > 0 and report["bare"]["tokens_per_s"] > 0 and report["ratio"] > 0
    assert "| ours |" in (tmp_path / "train-cpu-smoke.md").read_text()


def test_trainer_starts_from_a_hugging_face_checkpoint(make_config, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from gpt2.data import prepare as data

    settings = load_settings(make_config(), environ={})
    vocab = data.load_meta(data.prepare(settings.data))["vocab_size"]
    hf_config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path / "hf")
    config = make_config({"MODEL_INIT_HF": "y", "MODEL_HF_CHECKPOINT_DIR": str(tmp_path / "hf"),
                          "TRAIN_MAX_ITERS": "2", "TRAIN_EVAL_INTERVAL": "2"}, name="hf-config")
    assert train_in_process(config, tmp_path / "run") == 0
    assert "init hf" in (tmp_path / "run" / "train.log").read_text()
    wrong = make_config({"MODEL_INIT_HF": "y", "MODEL_HF_CHECKPOINT_DIR": str(tmp_path / "hf"),
                         "MODEL_BLOCK_SIZE": "128"}, name="hf-wrong")
    assert train_in_process(wrong, tmp_path / "wrong") == 1
    assert "block_size: config 128 > checkpoint n_positions 64" in metrics(tmp_path / "wrong")["failure_reason"]


# ---- TrainStep: composed-weight caching under gradient accumulation --------------------------------

class ListBatches:
    """BatchSource stand-in: the same fixed micro-batches, in order."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]


def accumulated_step(backend, cache_composition, disc=False):
    """Parameters after one TrainStep (grad_accum 4, fp32 CPU) of a tiny GPT with `backend`."""
    import torch

    from gpt2.model.gpt import GPT
    from gpt2.train.step import TrainStep
    from test_attention_helpers import attn_settings, kv_settings, mlp_settings, model_settings, randomize

    torch.manual_seed(0)
    model = GPT(model_settings(n_embd=16, n_head=2, n_layer=2, block_size=8), attn_settings(backend, disc=disc),
                mlp_settings(), kv_settings(), 50, seed=0)
    for block in model.transformer.h:
        randomize(block.attn, seed=1, shared=False)  # gates, P, u away from their initial values
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step = TrainStep(model, model, optimizer, device=torch.device("cpu"), precision="fp32", grad_accum=4,
                     grad_clip=0.0, cache_composition=cache_composition)
    g = torch.Generator().manual_seed(3)
    batches = ListBatches([(torch.randint(50, (2, 8), generator=g), torch.randint(50, (2, 8), generator=g))
                           for _ in range(4)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = step(batches)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return loss, after, before


@pytest.mark.parametrize("disc", [False, True])
def test_cached_composition_step_equals_per_forward_composition(disc, monkeypatch):
    """ra-unified, grad_accum 4: composing once per step gives the parameters of composing per forward."""
    import torch

    from gpt2.model.attention.unified import RAUnifiedAttention

    calls = []
    compose = RAUnifiedAttention.composed_qkv
    monkeypatch.setattr(RAUnifiedAttention, "composed_qkv", lambda self: calls.append(1) or compose(self))
    loss_cached, cached, before = accumulated_step("ra-unified", True, disc)
    assert len(calls) == 2  # once per layer for the whole step, not once per micro-step
    calls.clear()
    loss_plain, plain, _ = accumulated_step("ra-unified", False, disc)
    assert len(calls) == 2 * 4
    torch.testing.assert_close(loss_cached, loss_plain)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    # The composition's gradient really reached c_attn, P and the gates (they moved).
    composed_from = [n for n in plain if n.endswith((".P", "w_std.sqrt_weight", "w_rec.sqrt_weight", "c_attn.weight")
                                                     + ((".u", "w_disc.sqrt_weight") if disc else ()))]
    assert len(composed_from) == 2 * (6 if disc else 4)
    assert all(not torch.equal(cached[n], before[n]) for n in composed_from)


@pytest.mark.parametrize("backend", ["sdpa", "ra-same-flop", "ra-fold-full"])
def test_cached_composition_is_a_no_op_for_other_backends(backend):
    import torch

    loss_cached, cached, _ = accumulated_step(backend, True)
    loss_plain, plain, _ = accumulated_step(backend, False)
    assert torch.equal(loss_cached, loss_plain)
    assert all(torch.equal(cached[n], plain[n]) for n in plain)


def test_cached_composition_needs_accumulation_and_under_ddp_a_reduce():
    import torch

    from gpt2.train.step import TrainStep

    from gpt2.model.gpt import GPT
    from gpt2.model.attention.triton_support import triton_runs_on
    from test_attention_helpers import attn_settings, kv_settings, mlp_settings, model_settings

    model = GPT(model_settings(n_embd=16, n_head=2, n_layer=1, block_size=8), attn_settings("ra-unified"),
                mlp_settings(), kv_settings(), 50)
    make = lambda **kw: TrainStep(model, model, None, device=torch.device("cpu"), precision="fp32",  # noqa: E731
                                  grad_clip=0.0, **kw)
    assert make(grad_accum=4).cache_composition
    # One micro-step: only where ra-unified's kernels compose every layer in one launch (CUDA, or interpreted).
    assert make(grad_accum=1).cache_composition == triton_runs_on(model.transformer.h[0].attn.c_attn.weight)
    assert not make(grad_accum=4, ddp=True).cache_composition
    with pytest.raises(ValueError, match="single-process"):
        make(grad_accum=4, ddp=True, cache_composition=True)


def test_head_routing_is_refreshed_at_evaluations_and_after_loading(make_config, tmp_path, monkeypatch):
    """A head whose w_rec falls below CONFIG_ATTN_HEAD_SELECT_THRESHOLD is logged as switched at the next
    evaluation, and a resumed run routes it from the loaded gates before its first step."""
    import torch

    from gpt2.train.step import TrainStep

    config = make_config({"ATTN_BACKEND_RA_FOLD_FULL": "y", "ATTN_HEAD_SELECT_THRESHOLD": "0.3",
                          "TRAIN_MAX_ITERS": "8", "TRAIN_EVAL_INTERVAL": "4", "TRAIN_CHECKPOINT_INTERVAL": "0"})
    step = TrainStep.__call__

    def step_then_drop_a_head(self, batches, inject_nan=False):
        loss = step(self, batches, inject_nan)
        if not hasattr(self, "dropped"):  # after the first step: w_rec of layer 1, head 0 -> 0
            with torch.no_grad():
                self.raw_model.transformer.h[1].attn.w_rec.sqrt_weight[0] = 0.0
            self.dropped = True
        return loss

    monkeypatch.setattr(TrainStep, "__call__", step_then_drop_a_head)
    run_dir = tmp_path / "run"
    assert train_in_process(config, run_dir) == 0
    n_head = load_settings(config, environ={}).model.n_head
    lines = [line for line in (run_dir / "train.log").read_text().splitlines() if "routing:" in line]
    assert len(lines) == 1 and f"routing: layer 1 now 1/{n_head} heads on the plain path" in lines[0], lines
    assert "heads [0]" in lines[0]
    monkeypatch.setattr(TrainStep, "__call__", step)
    assert train_in_process(config, run_dir, resume=True, environ={"GPT2_MAX_ITERS": "10"}) == 0
    log_text = (run_dir / "train.log").read_text()
    assert log_text.count(f"routing: layer 1 now 1/{n_head} heads on the plain path") == 2
    assert log_text.index("resuming at iter 8") < log_text.rindex("routing: layer 1")


def test_cuda_graphs_refuse_accumulation_and_ddp():
    import torch

    from gpt2.train.step import TrainStep

    model = torch.nn.Linear(2, 2)
    for kwargs in ({"grad_accum": 2}, {"grad_accum": 1, "ddp": True}):
        with pytest.raises(ValueError, match="CUDA graphs need one process and one micro-batch"):
            TrainStep(model, model, None, device=torch.device("cpu"), precision="fp32", grad_clip=1.0,
                      cuda_graphs=True, **{"ddp": False, **kwargs})


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("backend", ["SDPA", "RA_UNIFIED"])
def test_cuda_graph_steps_train_as_the_plain_compiled_steps(make_config, tmp_path, backend):
    """The same run compiled with and without CUDA graphs (dropout on, evaluations between steps, losses read
    back only at sync points) follows the same loss curve."""
    over = {"DEVICE_CUDA": "y", "PRECISION_FP32": "y", "TORCH_COMPILE": "y", "TRAIN_MAX_ITERS": "12",
            "TRAIN_LOG_INTERVAL": "1", "TRAIN_EVAL_INTERVAL": "4", "TRAIN_CHECKPOINT_INTERVAL": "0",
            "MODEL_DROPOUT": "0.0", f"ATTN_BACKEND_{backend}": "y"}
    plain = make_config(over, name="plain")
    graphs = make_config({**over, "TORCH_COMPILE_CUDA_GRAPHS": "y"}, name="graphs")
    assert train_in_process(plain, tmp_path / "run-plain") == 0
    assert train_in_process(graphs, tmp_path / "run-graphs") == 0
    assert "compile on, CUDA graphs" in (tmp_path / "run-graphs" / "train.log").read_text()
    a, b = step_losses(tmp_path / "run-plain"), step_losses(tmp_path / "run-graphs")
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3 * max(abs(x) for x in a)
    va = [r["val_loss"] for r in read_jsonl(tmp_path / "run-plain" / "eval.jsonl")]
    vb = [r["val_loss"] for r in read_jsonl(tmp_path / "run-graphs" / "eval.jsonl")]
    assert len(va) == len(vb) == 3 and max(abs(x - y) for x, y in zip(va, vb)) < 1e-3 * va[0]
