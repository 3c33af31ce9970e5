"""Typed, frozen settings grouped by component, with the checks that involve more than one field.

Each field names the Kconfig symbol it is read from (``metadata["symbol"]``). Its default is what the
Kconfig tree gives with no ``.config`` at all, so the library stands alone (``Settings()``,
``ModelSettings(n_layer=2)``); tests/test_settings_defaults.py keeps the two equal. Ranges and
dependencies live in the Kconfig tree; ``lib/config`` is the one reader that fills these dataclasses from
a ``.config``.

Field kinds (``metadata["kind"]``):
  bool    y/n symbol
  int     int symbol (range checked by Kconfig; an int whose dependency is off reads 0)
  str     string symbol
  float   string symbol holding a float, validated here (optional "min"/"max")
  choice  a Kconfig choice whose members are named <symbol>_<VALUE>; the field holds
          the selected member's suffix, lower-cased, '_' -> '-'
          (ATTN_BACKEND_RA_FOLD_FULL -> "ra-fold-full")
  list    comma-separated string symbol -> tuple of str (empty string -> ())
"""

from dataclasses import dataclass, field, fields


def _sym(symbol: str, kind: str, default, **extra):
    return field(default=default, metadata={"symbol": symbol, "kind": kind, **extra})


@dataclass(frozen=True)
class GeneralSettings:
    device: str = _sym("DEVICE", "choice", "auto")  # auto | cuda | cpu
    precision: str = _sym("PRECISION", "choice", "bf16")  # bf16 | fp16 | fp32
    compile: bool = _sym("TORCH_COMPILE", "bool", False)
    cuda_graphs: bool = _sym("TORCH_COMPILE_CUDA_GRAPHS", "bool", False)  # compile mode "reduce-overhead"
    seed: int = _sym("SEED", "int", 1)
    results_dir: str = _sym("RESULTS_DIR", "str", "results")


@dataclass(frozen=True)
class ModelSettings:
    size: str = _sym("MODEL_SIZE", "choice", "gpt2-124m")  # gpt2-tiny | gpt2-mini | gpt2-124m | ... | custom
    n_layer: int = _sym("MODEL_N_LAYER", "int", 12)
    n_head: int = _sym("MODEL_N_HEAD", "int", 12)
    n_embd: int = _sym("MODEL_N_EMBD", "int", 768)
    block_size: int = _sym("MODEL_BLOCK_SIZE", "int", 1024)
    dropout: float = _sym("MODEL_DROPOUT", "float", 0.0, min=0.0, max=0.9)
    bias: bool = _sym("MODEL_BIAS", "bool", True)
    tie_weights: bool = _sym("MODEL_TIE_WEIGHTS", "bool", True)
    init_from: str = _sym("MODEL_INIT", "choice", "scratch")  # scratch | hf
    hf_checkpoint_dir: str = _sym("MODEL_HF_CHECKPOINT_DIR", "str", "")

    @property
    def head_dim(self) -> int:
        """D = n_embd / n_head; the width must split evenly into the heads."""
        if self.n_embd % self.n_head:
            raise ValueError(f"CONFIG_MODEL_N_EMBD={self.n_embd} is not divisible by "
                             f"CONFIG_MODEL_N_HEAD={self.n_head}; choose a width that is a multiple of the head count")
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class DataSettings:
    dataset: str = _sym("DATASET", "choice", "shakespeare")  # shakespeare | fineweb-edu | openwebtext | custom
    custom_text_path: str = _sym("DATASET_CUSTOM_PATH", "str", "")
    tokenizer: str = _sym("TOKENIZER", "choice", "gpt2")  # gpt2 | char
    data_dir: str = _sym("DATA_DIR", "str", "data")
    token_cap: int = _sym("DATA_TOKEN_CAP", "int", 0)  # streamed sets only; 0 for local sets
    prep_workers: int = _sym("DATA_PREP_WORKERS", "int", 0)  # streamed sets' tokenizer processes; 0 = all cores


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int = _sym("TRAIN_BATCH_SIZE", "int", 16)
    grad_accum: int = _sym("TRAIN_GRAD_ACCUM", "int", 1)
    lr: float = _sym("TRAIN_LR", "float", 6e-4, min=0.0, max=1.0)
    lr_min: float = _sym("TRAIN_LR_MIN", "float", 6e-5, min=0.0, max=1.0)
    warmup_fraction: float = _sym("TRAIN_WARMUP_FRACTION", "float", 0.02, min=0.0, max=0.5)
    schedule: str = _sym("TRAIN_SCHEDULE", "choice", "cosine")  # cosine | linear | constant
    max_iters: int = _sym("TRAIN_MAX_ITERS", "int", 0)  # 0 = no iteration cap
    max_time_s: int = _sym("GPT2_MAX_TIME", "int", 600)  # 0 = no time cap; env GPT2_MAX_TIME overrides
    grad_clip: float = _sym("TRAIN_GRAD_CLIP", "float", 1.0, min=0.0, max=1e6)
    eval_interval: int = _sym("TRAIN_EVAL_INTERVAL", "int", 250)
    eval_batches: int = _sym("TRAIN_EVAL_BATCHES", "int", 20)
    log_interval: int = _sym("TRAIN_LOG_INTERVAL", "int", 10)
    checkpoint_interval: int = _sym("TRAIN_CHECKPOINT_INTERVAL", "int", 1000)
    keep_best_checkpoint: bool = _sym("TRAIN_KEEP_BEST_CHECKPOINT", "bool", True)  # ckpt-best.pt
    num_gpus: int = _sym("TRAIN_NUM_GPUS", "int", 1)
    inject_nan_at_iter: int = _sym("DEBUG_INJECT_NAN_AT_ITER", "int", 0)  # test-only; 0 = off


def check_budget(max_time_s: float, max_iters: int) -> None:
    """A run stops at whichever of its caps it reaches first (0 disables one); with neither it never stops."""
    if max_time_s <= 0 and max_iters <= 0:
        raise ValueError("no budget: CONFIG_GPT2_MAX_TIME and CONFIG_TRAIN_MAX_ITERS are both 0, so the run would "
                         "never stop; set one (GPT2_MAX_TIME=600 make)")


@dataclass(frozen=True)
class OptimizerSettings:
    name: str = _sym("OPTIMIZER", "choice", "adamw")  # adamw | adamw-spam
    beta1: float = _sym("OPT_BETA1", "float", 0.9, min=0.0, max=1.0)
    beta2: float = _sym("OPT_BETA2", "float", 0.95, min=0.0, max=1.0)
    weight_decay: float = _sym("OPT_WEIGHT_DECAY", "float", 0.1, min=0.0, max=1.0)
    spam_theta: float = _sym("OPT_SPAM_THETA", "float", 0.0, min=0.0, max=1e9)
    spam_reset_interval: int = _sym("OPT_SPAM_RESET_INTERVAL", "int", 0)
    spam_warmup: int = _sym("OPT_SPAM_WARMUP", "int", 0)


@dataclass(frozen=True)
class AttentionSettings:
    # The defaults are sdpa's; the RA options depend on an RA backend, so with it off they read 0 / "".
    backend: str = _sym("ATTN_BACKEND", "choice", "sdpa")
    # sdpa | ra-reference | ra-fold-full | ra-fold-lowrank | ra-same-flop | ra-unified
    reciprocal_rank: int = _sym("ATTN_RA_RANK", "int", 0)
    # tied | untied for ra-same-flop / ra-unified ("" elsewhere); registry.py says what each spans
    reciprocal_form: str = _sym("ATTN_RA_FORM", "choice", "")
    gate_granularity: str = _sym("ATTN_GATE", "choice", "")  # per-head | per-layer
    w_std_init: float = _sym("ATTN_W_STD_INIT", "float", 0.0, min=0.0, max=10.0)
    w_rec_init: float = _sym("ATTN_W_REC_INIT", "float", 0.0, min=0.0, max=10.0)
    head_select_threshold: float = _sym("ATTN_HEAD_SELECT_THRESHOLD", "float", 0.0, min=0.0, max=10.0)
    w_rec_l1: float = _sym("ATTN_W_REC_L1", "float", 0.0, min=0.0, max=10.0)
    discoverability: bool = _sym("ATTN_DISCOVERABILITY", "bool", False)
    self_restart: bool = _sym("ATTN_SELF_RESTART", "bool", False)


@dataclass(frozen=True)
class MLPSettings:
    kind: str = _sym("MLP", "choice", "standard")  # standard | reciprocal
    expansion: int = _sym("MLP_EXPANSION", "int", 4)  # hidden = expansion * n_embd
    reciprocal_ff: int = _sym("MLP_RA_RFF", "int", 0)
    mixer: bool = _sym("MLP_RA_MIXER", "bool", False)
    gates: bool = _sym("MLP_RA_GATES", "bool", False)

    def check_reciprocal_ff(self, n_embd: int) -> None:
        """The R-MLP splits its expansion * n_embd hidden units into standard and R_ff reciprocal ones, keeping
        at least one of each: 1 <= R_ff < expansion * n_embd."""
        hidden = self.expansion * n_embd
        if self.kind == "reciprocal" and not 1 <= self.reciprocal_ff < hidden:
            raise ValueError(f"CONFIG_MLP_RA_RFF={self.reciprocal_ff} is outside 1..{hidden - 1} "
                             f"(below the hidden size {self.expansion} x {n_embd})")


@dataclass(frozen=True)
class KVPruningSettings:
    enabled: bool = _sym("KV_PRUNE", "bool", False)
    keep_ratio: float = _sym("KV_PRUNE_KEEP_RATIO", "float", 0.0, min=0.0, max=1.0)
    recency_window: int = _sym("KV_PRUNE_RECENCY", "int", 0)
    use_sampling: bool = _sym("RA_USE_SAMPLING", "bool", False)
    sampling_min_length: int = _sym("RA_SAMPLING_MIN_LENGTH", "int", 0)
    sample_fraction: float = _sym("RA_SAMPLE_FRACTION", "float", 0.0, min=0.0, max=1.0)


@dataclass(frozen=True)
class MatrixSettings:
    enabled: bool = _sym("MATRIX", "bool", False)
    steps: tuple = _sym("MATRIX_STEPS", "list", ())  # ids from lib/config/ablation_steps.yaml
    seeds: tuple = _sym("MATRIX_SEEDS", "list", ())
    defconfigs: tuple = _sym("MATRIX_DEFCONFIGS", "list", ())
    sweep: str = _sym("MATRIX_SWEEP", "str", "")  # "SYMBOL=v1,v2;SYMBOL2=..." (lib/matrix/sweep.py parses it)
    parallel_cells: int = _sym("MATRIX_PARALLEL", "int", 0)  # 0 = one cell per free GPU group
    stop_on_failure: bool = _sym("MATRIX_STOP_ON_FAILURE", "bool", False)


@dataclass(frozen=True)
class TrackingSettings:
    backend: str = _sym("TRACKING", "choice", "none")  # none | tensorboard | trackio | wandb
    project: str = _sym("TRACKING_PROJECT", "str", "")
    offline: bool = _sym("TRACKING_OFFLINE", "bool", False)


@dataclass(frozen=True)
class EvalSettings:
    after_train: bool = _sym("EVAL_AFTER_TRAIN", "bool", False)  # lib/evaluate.evaluate_run when a run ends
    hellaswag_limit: int = _sym("EVAL_HELLASWAG_LIMIT", "int", 0)  # first N items; 0 = all 10,042


@dataclass(frozen=True)
class SampleSettings:
    """`make sample` (lib/runs/sample.py): what to generate from a run's checkpoint."""
    prompt: str = _sym("SAMPLE_PROMPT", "str", "")  # "": the end-of-text token (or a newline for char vocabularies)
    num_samples: int = _sym("SAMPLE_NUM_SAMPLES", "int", 2)
    max_new_tokens: int = _sym("SAMPLE_MAX_NEW_TOKENS", "int", 256)
    temperature: float = _sym("SAMPLE_TEMPERATURE", "float", 0.8, min=0.0, max=100.0)  # 0 = greedy
    top_k: int = _sym("SAMPLE_TOP_K", "int", 200)  # 0 = the whole vocabulary
    seed: int = _sym("SAMPLE_SEED", "int", 1)
    checkpoint: str = _sym("SAMPLE_CHECKPOINT", "choice", "best")  # best | last (gpt2.train.trained)


@dataclass(frozen=True)
class Settings:
    general: GeneralSettings = field(default_factory=GeneralSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    attention: AttentionSettings = field(default_factory=AttentionSettings)
    mlp: MLPSettings = field(default_factory=MLPSettings)
    kv_pruning: KVPruningSettings = field(default_factory=KVPruningSettings)
    matrix: MatrixSettings = field(default_factory=MatrixSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)


def component_classes():
    """(attribute name, dataclass) for every component of Settings, in order."""
    return [(f.name, f.type if isinstance(f.type, type) else globals()[f.type]) for f in fields(Settings)]
