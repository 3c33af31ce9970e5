"""Typed, frozen settings grouped by component.

Each field names the Kconfig symbol it is read from (``metadata["symbol"]``). The
defaults, ranges and dependencies live in the Kconfig tree only; ``lib/config.py``
is the one reader that fills these dataclasses from a ``.config``.

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


def _sym(symbol: str, kind: str, **extra):
    return field(metadata={"symbol": symbol, "kind": kind, **extra})


@dataclass(frozen=True)
class GeneralSettings:
    device: str = _sym("DEVICE", "choice")  # auto | cuda | cpu
    precision: str = _sym("PRECISION", "choice")  # bf16 | fp16 | fp32
    compile: bool = _sym("TORCH_COMPILE", "bool")
    seed: int = _sym("SEED", "int")
    results_dir: str = _sym("RESULTS_DIR", "str")


@dataclass(frozen=True)
class ModelSettings:
    size: str = _sym("MODEL_SIZE", "choice")  # gpt2-tiny | gpt2-small-cpu | gpt2-124m | ...
    n_layer: int = _sym("MODEL_N_LAYER", "int")
    n_head: int = _sym("MODEL_N_HEAD", "int")
    n_embd: int = _sym("MODEL_N_EMBD", "int")
    block_size: int = _sym("MODEL_BLOCK_SIZE", "int")
    dropout: float = _sym("MODEL_DROPOUT", "float", min=0.0, max=0.9)
    bias: bool = _sym("MODEL_BIAS", "bool")
    tie_weights: bool = _sym("MODEL_TIE_WEIGHTS", "bool")
    init_from: str = _sym("MODEL_INIT", "choice")  # scratch | hf
    hf_checkpoint_dir: str = _sym("MODEL_HF_CHECKPOINT_DIR", "str")


@dataclass(frozen=True)
class DataSettings:
    dataset: str = _sym("DATASET", "choice")  # shakespeare | fineweb-edu | openwebtext | custom
    custom_text_path: str = _sym("DATASET_CUSTOM_PATH", "str")
    tokenizer: str = _sym("TOKENIZER", "choice")  # gpt2 | char
    data_dir: str = _sym("DATA_DIR", "str")
    token_cap: int = _sym("DATA_TOKEN_CAP", "int")  # streamed sets only; 0 for local sets


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int = _sym("TRAIN_BATCH_SIZE", "int")
    grad_accum: int = _sym("TRAIN_GRAD_ACCUM", "int")
    lr: float = _sym("TRAIN_LR", "float", min=0.0, max=1.0)
    lr_min: float = _sym("TRAIN_LR_MIN", "float", min=0.0, max=1.0)
    warmup_fraction: float = _sym("TRAIN_WARMUP_FRACTION", "float", min=0.0, max=0.5)
    schedule: str = _sym("TRAIN_SCHEDULE", "choice")  # cosine | linear | constant
    max_iters: int = _sym("TRAIN_MAX_ITERS", "int")  # 0 = no iteration cap
    max_time_s: int = _sym("GPT2_MAX_TIME", "int")  # 0 = no time cap; env GPT2_MAX_TIME overrides
    grad_clip: float = _sym("TRAIN_GRAD_CLIP", "float", min=0.0, max=1e6)
    eval_interval: int = _sym("TRAIN_EVAL_INTERVAL", "int")
    eval_batches: int = _sym("TRAIN_EVAL_BATCHES", "int")
    log_interval: int = _sym("TRAIN_LOG_INTERVAL", "int")
    checkpoint_interval: int = _sym("TRAIN_CHECKPOINT_INTERVAL", "int")
    num_gpus: int = _sym("TRAIN_NUM_GPUS", "int")
    inject_nan_at_iter: int = _sym("DEBUG_INJECT_NAN_AT_ITER", "int")  # test-only; 0 = off


@dataclass(frozen=True)
class OptimizerSettings:
    name: str = _sym("OPTIMIZER", "choice")  # adamw | adamw-spam
    beta1: float = _sym("OPT_BETA1", "float", min=0.0, max=1.0)
    beta2: float = _sym("OPT_BETA2", "float", min=0.0, max=1.0)
    weight_decay: float = _sym("OPT_WEIGHT_DECAY", "float", min=0.0, max=1.0)
    spam_theta: float = _sym("OPT_SPAM_THETA", "float", min=0.0, max=1e9)
    spam_reset_interval: int = _sym("OPT_SPAM_RESET_INTERVAL", "int")
    spam_warmup: int = _sym("OPT_SPAM_WARMUP", "int")


@dataclass(frozen=True)
class AttentionSettings:
    backend: str = _sym("ATTN_BACKEND", "choice")
    # sdpa | ra-reference | ra-fold-full | ra-fold-lowrank | ra-same-flop | ra-unified
    reciprocal_rank: int = _sym("ATTN_RA_RANK", "int")
    gate_granularity: str = _sym("ATTN_GATE", "choice")  # per-head | per-layer
    w_std_init: float = _sym("ATTN_W_STD_INIT", "float", min=0.0, max=10.0)
    w_rec_init: float = _sym("ATTN_W_REC_INIT", "float", min=0.0, max=10.0)
    head_select_threshold: float = _sym("ATTN_HEAD_SELECT_THRESHOLD", "float", min=0.0, max=10.0)
    w_rec_l1: float = _sym("ATTN_W_REC_L1", "float", min=0.0, max=10.0)
    discoverability: bool = _sym("ATTN_DISCOVERABILITY", "bool")
    self_restart: bool = _sym("ATTN_SELF_RESTART", "bool")


@dataclass(frozen=True)
class MLPSettings:
    kind: str = _sym("MLP", "choice")  # standard | reciprocal
    expansion: int = _sym("MLP_EXPANSION", "int")  # hidden = expansion * n_embd
    reciprocal_ff: int = _sym("MLP_RA_RFF", "int")
    mixer: bool = _sym("MLP_RA_MIXER", "bool")
    gates: bool = _sym("MLP_RA_GATES", "bool")


@dataclass(frozen=True)
class KVPruningSettings:
    enabled: bool = _sym("KV_PRUNE", "bool")
    keep_ratio: float = _sym("KV_PRUNE_KEEP_RATIO", "float", min=0.0, max=1.0)
    recency_window: int = _sym("KV_PRUNE_RECENCY", "int")
    use_sampling: bool = _sym("RA_USE_SAMPLING", "bool")
    sampling_min_length: int = _sym("RA_SAMPLING_MIN_LENGTH", "int")
    sample_fraction: float = _sym("RA_SAMPLE_FRACTION", "float", min=0.0, max=1.0)


@dataclass(frozen=True)
class MatrixSettings:
    enabled: bool = _sym("MATRIX", "bool")
    steps: tuple = _sym("MATRIX_STEPS", "list")  # ids from lib/config/ablation_steps.yaml
    seeds: tuple = _sym("MATRIX_SEEDS", "list")
    defconfigs: tuple = _sym("MATRIX_DEFCONFIGS", "list")
    parallel_cells: int = _sym("MATRIX_PARALLEL", "int")  # 0 = one cell per free GPU group
    stop_on_failure: bool = _sym("MATRIX_STOP_ON_FAILURE", "bool")


@dataclass(frozen=True)
class TrackingSettings:
    backend: str = _sym("TRACKING", "choice")  # none | tensorboard | trackio | wandb
    project: str = _sym("TRACKING_PROJECT", "str")


@dataclass(frozen=True)
class Settings:
    general: GeneralSettings
    model: ModelSettings
    data: DataSettings
    train: TrainSettings
    optimizer: OptimizerSettings
    attention: AttentionSettings
    mlp: MLPSettings
    kv_pruning: KVPruningSettings
    matrix: MatrixSettings
    tracking: TrackingSettings


def component_classes():
    """(attribute name, dataclass) for every component of Settings, in order."""
    return [(f.name, f.type if isinstance(f.type, type) else globals()[f.type]) for f in fields(Settings)]
