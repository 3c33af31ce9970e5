# Thin dispatcher: every recipe is one command; the logic lives in scripts/ and lib/.
# `make help` lists targets (the `## ` comments below), presets and environment overrides.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PRESETS := $(notdir $(wildcard defconfigs/*))

.DEFAULT_GOAL := run
.PHONY: run train resume data matrix check continue report steps menuconfig defconfig savedefconfig \
        olddefconfig listnewconfig showconfig bench-train bench-attention test test-kernels help venv clean-venv

run: .config | $(STAMP) ## train, or run the test matrix when the config is a matrix
	$(PY) -m scripts.run --config .config

train: .config | $(STAMP) ## one training run of .config (even when it is a matrix preset)
	$(PY) -m scripts.run --config .config --single

resume: .config | $(STAMP) ## resume the newest single run (RUN=<dir> to choose) with its remaining budget
	$(PY) -m scripts.run --config .config --resume $(RUN)

data: .config | $(STAMP) ## prepare the dataset of .config (done automatically by make)
	$(PY) -m scripts.prepare_data --config .config

matrix: .config | $(STAMP) ## run the matrix of .config (DEFCONFIGS="a b" compares whole presets)
	$(PY) -m scripts.matrix run --config .config --defconfigs "$(DEFCONFIGS)"

check: .config | $(STAMP) ## dry run: print the matrix plan and run each cell a few steps on a tiny model
	$(PY) -m scripts.matrix check --config .config --defconfigs "$(DEFCONFIGS)"

continue: .config | $(STAMP) ## resume the newest matrix: done cells are kept, interrupted ones resume
	$(PY) -m scripts.matrix continue --config .config

report: | $(STAMP) ## regenerate the report of the newest matrix or run (DIR=<dir> to choose)
	$(PY) -m scripts.report $(DIR)

steps: | $(STAMP) ## list the ablation steps (lib/config/ablation_steps.yaml)
	$(PY) -m scripts.steps

menuconfig: | $(STAMP) ## terminal UI over the Kconfig tree (help on every option: press ?)
	$(PY) -m scripts.config menuconfig

defconfig: | $(STAMP) ## load the default preset (lib/config/paths.py) into .config, as Linux does
	$(PY) -m scripts.config defconfig

defconfig-%: | $(STAMP) ## load defconfigs/<preset> into .config (fails, leaving .config alone, on any error)
	$(PY) -m scripts.config defconfig $*

# One explicit target per preset, so the shell can tab-complete them.
$(addprefix defconfig-,$(PRESETS)): defconfig-%: | $(STAMP)
	$(PY) -m scripts.config defconfig $*

savedefconfig: .config | $(STAMP) ## write ./defconfig, the minimal form of .config
	$(PY) -m scripts.config savedefconfig

olddefconfig: .config | $(STAMP) ## refresh .config after editing Kconfig or .config by hand
	$(PY) -m scripts.config olddefconfig

listnewconfig: .config | $(STAMP) ## list options that .config does not set
	$(PY) -m scripts.config listnewconfig

showconfig: .config | $(STAMP) ## print the typed settings .config resolves to
	$(PY) -m scripts.config show

bench-train: | $(STAMP) ## GPU: training throughput vs a bare loop -> results/bench/train-<gpu>.md
	$(PY) -m scripts.bench_train

bench-attention: | $(STAMP) ## GPU: every attention backend vs SDPA -> results/bench/attention-<gpu>.md
	$(PY) -m scripts.bench_attention

test: | $(STAMP) ## run the test suite (CPU)
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

# With no .config, start from the CPU laptop preset.
.config: | $(STAMP)
	$(PY) -m scripts.config defconfig

venv: $(STAMP) ## create the virtual environment (pinned requirements.txt)

$(STAMP): requirements.txt
	scripts/make_venv.sh $(VENV) requirements.txt

clean-venv: ## remove the virtual environment
	rm -rf $(VENV)
