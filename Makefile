# Thin dispatcher: every recipe is one command; the logic lives in scripts/ and lib/.
# `make help` lists targets (the `## ` comments below), presets, environment overrides and make variables.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PRESETS := $(notdir $(wildcard defconfigs/*))
# The configuration every target reads and writes, as in Linux: make KCONFIG_CONFIG=other.config train
KCONFIG_CONFIG ?= .config
# make set's options: only from the command line, so an ARGS left in the environment never sets anything.
SET_ARGS = $(if $(filter command line,$(origin ARGS)),$(ARGS))

.DEFAULT_GOAL := run
.PHONY: run train resume data matrix check continue report eval export sample steps menuconfig defconfig savedefconfig \
        olddefconfig oldconfig alldefconfig listnewconfig showconfig set bench-train bench-attention bench-data bench-cells bench-ddp test \
        test-kernels help venv clean-venv cell extras

run: $(KCONFIG_CONFIG) | $(STAMP) extras ## train, or run the test matrix when the config is a matrix
	$(PY) -m scripts.run --config $(KCONFIG_CONFIG)

train: $(KCONFIG_CONFIG) | $(STAMP) extras ## one training run of .config (even when it is a matrix preset)
	$(PY) -m scripts.run --config $(KCONFIG_CONFIG) --single

resume: $(KCONFIG_CONFIG) | $(STAMP) extras ## resume the newest unfinished run with its own config and budget (RUN=<dir>; EXTEND=600s|1000it: a finished one)
	$(PY) -m scripts.run --config $(KCONFIG_CONFIG) --resume $(RUN) --extend "$(EXTEND)"

cell: $(KCONFIG_CONFIG) | $(STAMP) extras ## train one planned matrix cell alone in a fresh directory: make cell CELL=V1-s2 [DEFCONFIGS="a b"]
	$(PY) -m scripts.matrix cell "$(CELL)" --config $(KCONFIG_CONFIG) --defconfigs "$(DEFCONFIGS)"

data: $(KCONFIG_CONFIG) | $(STAMP) ## prepare the dataset of .config (done automatically by make)
	$(PY) -m scripts.prepare_data --config $(KCONFIG_CONFIG)

matrix: $(KCONFIG_CONFIG) | $(STAMP) extras ## run the matrix of .config (DEFCONFIGS="a b" compares whole presets)
	$(PY) -m scripts.matrix run --config $(KCONFIG_CONFIG) --defconfigs "$(DEFCONFIGS)"

check: $(KCONFIG_CONFIG) | $(STAMP) ## dry run: print the matrix plan and run each cell a few steps on a tiny model
	$(PY) -m scripts.matrix check --config $(KCONFIG_CONFIG) --defconfigs "$(DEFCONFIGS)"

continue: $(KCONFIG_CONFIG) | $(STAMP) extras ## resume the newest matrix: done cells are kept, interrupted ones resume
	$(PY) -m scripts.matrix continue --config $(KCONFIG_CONFIG)

report: | $(STAMP) ## regenerate the report of the newest matrix or run (DIR=<dir> to choose)
	$(PY) -m scripts.report $(DIR)

eval: | $(STAMP) ## val loss + HellaSwag of a run -> <run>/eval.json (RUN=<dir>, default the newest; CKPT=best|last; LIMIT=N items)
	$(PY) -m scripts.eval $(RUN) --config $(KCONFIG_CONFIG) --checkpoint $(or $(CKPT),best) --limit $(or $(LIMIT),0)

export: | $(STAMP) ## a run's model as a Hugging Face GPT-2 directory, or our format when it is not one (RUN=<dir>; OUT=<dir>; CKPT=best|last)
	$(PY) -m scripts.export $(RUN) $(if $(OUT),--out $(OUT)) --checkpoint $(or $(CKPT),best)

# make sample's PROMPT, NUM, TOKENS, TEMP, TOPK, SEED count only from the command line (TEMP and SEED are common
# environment names); the recipe reads each from its environment ("$$NAME"), so quotes and spaces pass intact.
SAMPLE_ARG = $(if $(filter command line,$(origin $(1))),$(2) "$$$(1)")
sample: $(KCONFIG_CONFIG) | $(STAMP) ## print text from a run's checkpoint: RUN=<dir> PROMPT= NUM= TOKENS= TEMP= TOPK= SEED= CKPT=best|last (defaults: the Sampling menu)
	$(PY) -m scripts.sample --config $(KCONFIG_CONFIG) $(if $(RUN),--run "$(RUN)") $(if $(CKPT),--checkpoint "$(CKPT)") $(call SAMPLE_ARG,PROMPT,--prompt) $(call SAMPLE_ARG,NUM,--num) $(call SAMPLE_ARG,TOKENS,--tokens) $(call SAMPLE_ARG,TEMP,--temperature) $(call SAMPLE_ARG,TOPK,--top-k) $(call SAMPLE_ARG,SEED,--seed)

steps: | $(STAMP) ## list the ablation steps (lib/config/ablation_steps.yaml)
	$(PY) -m scripts.steps

menuconfig: | $(STAMP) ## terminal UI over the Kconfig tree (help on every option: press ?); saves are validated
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) menuconfig

set: $(KCONFIG_CONFIG) | $(STAMP) ## set options without the menu: make set ARGS="ATTN_RA_RANK=8 SEED=3" (validated)
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) set $(SET_ARGS)

defconfig: | $(STAMP) ## load the default preset (lib/config/paths.py) into .config, as Linux does
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) defconfig

defconfig-%: | $(STAMP) ## load defconfigs/<preset> into .config (fails, leaving .config alone, on any error)
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) defconfig $*

%_defconfig: | $(STAMP) ## the same as defconfig-<preset>, Linux's spelling
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) defconfig $*

# One explicit target per preset and spelling, so the shell can tab-complete them.
$(addprefix defconfig-,$(PRESETS)): defconfig-%: | $(STAMP)
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) defconfig $*

$(addsuffix _defconfig,$(PRESETS)): %_defconfig: | $(STAMP)
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) defconfig $*

alldefconfig: | $(STAMP) ## every option at its Kconfig default (no preset)
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) alldefconfig

savedefconfig: $(KCONFIG_CONFIG) | $(STAMP) ## write ./defconfig, the minimal form of .config (validated first)
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) savedefconfig

olddefconfig: $(KCONFIG_CONFIG) | $(STAMP) ## refresh .config after editing Kconfig or .config by hand; says what changed
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) olddefconfig

oldconfig: $(KCONFIG_CONFIG) | $(STAMP) ## like olddefconfig, but asks for each option .config does not set yet
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) oldconfig

listnewconfig: $(KCONFIG_CONFIG) | $(STAMP) ## list options that .config does not set
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) listnewconfig

showconfig: $(KCONFIG_CONFIG) | $(STAMP) ## print the typed settings .config resolves to
	$(PY) -m scripts.config --config $(KCONFIG_CONFIG) show

bench-train: | $(STAMP) ## GPU: training throughput vs a bare loop -> results/bench/train-<gpu>.md
	$(PY) -m scripts.bench_train

bench-attention: | $(STAMP) ## GPU: every attention backend vs SDPA -> results/bench/attention-<gpu>.md
	$(PY) -m scripts.bench_attention

bench-data: | $(STAMP) ## CPU: data preparation tokens/s, 1 process vs N -> results/bench/data-prep-<host>-<N>cores.md
	$(PY) -m scripts.bench_data

bench-cells: | $(STAMP) ## GPU: a matrix cell's wall time around its budget, 1 GPU vs all, cold cache -> results/bench/cells-<gpu>.md
	$(PY) -m scripts.bench_cells

bench-ddp: | $(STAMP) ## GPUs: one GPU vs DDP on all, ra-unified vs sdpa with accumulation -> results/bench/ddp-<gpu>-x<N>.md
	$(PY) -m scripts.bench_ddp

# The optional packages .config selects (extras/<name>.txt: a tracker), installed the first time it needs them.
extras: $(KCONFIG_CONFIG) | $(STAMP) ## install the optional packages .config needs (e.g. its tracker)
	$(PY) -m scripts.extras --config $(KCONFIG_CONFIG)

# The tests exercise every extra (each tracker, offline).
$(VENV)/.extras: $(wildcard extras/*.txt) | $(STAMP)
	$(PY) -m scripts.extras --all && touch $@

test: $(VENV)/.extras | $(STAMP) ## run the test suite (CPU)
	$(PY) -m pytest -q tests

# Triton is not in the CPU venv; the kernel tests get it in a directory of their own and run its interpreter.
TRITON_DIR := .triton
$(TRITON_DIR)/.installed: | $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(TRITON_DIR) triton==3.9.0 && touch $@

test-kernels: $(TRITON_DIR)/.installed ## the Triton kernels (and the RA backends through them) on CPU, interpreted
	TRITON_INTERPRET=1 PYTHONPATH=$(TRITON_DIR) $(PY) -m pytest -q tests/test_compose_kernel.py tests/test_same_flop_kernel.py tests/test_fold_traffic.py \
		tests/test_attention.py

help: | $(STAMP) ## this list, the presets and the environment overrides
	@$(PY) -m scripts.config help

# With no .config (or no $(KCONFIG_CONFIG)), start from the default preset.
$(KCONFIG_CONFIG): | $(STAMP)
	$(PY) -m scripts.config --config $@ defconfig

venv: $(STAMP) ## create the virtual environment (pinned requirements.txt)

$(STAMP): requirements.txt
	scripts/make_venv.sh $(VENV) requirements.txt

clean-venv: ## remove the virtual environment
	rm -rf $(VENV)
