# The README's two commands: `make run` (set-up + the embedded default job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/sinusoid.yaml
PYTEST_ARGS ?=

.PHONY: setup run test test-slow lint tensorboard clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build first, so the pinned range in pyproject.toml is already met (no CUDA download).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Meta-train MAML on sinusoid regression, then test the best checkpoint (MSE +- 95% CI).
run: $(STAMP)
	$(BIN)/lthmaml fit -c $(CONFIG) --test_after_fit true --trainer.enable_progress_bar false

# Tests use tiny tensors: one intra-op thread each is much faster than two fighting over two cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/pytest $(PYTEST_ARGS)

# The slow end-to-end tests (real Omniglot subset, kills and resumes); CI runs those marked `ci`.
test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/pytest -m "$(or $(MARK),slow)" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lthmaml callbacks tests bench
	$(BIN)/ruff format --check lthmaml callbacks tests bench

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir runs

clean:
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Fine-tune a pruned artifact on one local task as a Raspberry Pi would (configs/edge/pi.yaml), and
# print epochs, best epoch, wall time, peak memory and query accuracy/MSE before and after.
# Empty ARTIFACT/TASK: the latest run's last.ckpt (exported beside it) and a task built from it.
ARTIFACT ?=
TASK ?=
.PHONY: pi-finetune
pi-finetune: $(STAMP)
	$(BIN)/python -m lthmaml.pi_finetune --artifact "$(ARTIFACT)" --task "$(TASK)"

# Plots and a Markdown table of pruning runs: metric vs weights remaining, per-round best epoch and
# wall time, validation metric vs time, per-layer sparsity (see lthmaml/report.py).
RUNS ?= runs
OUT ?= report
.PHONY: report
report: $(STAMP)
	$(BIN)/python -m lthmaml.report $(RUNS) -o $(OUT)
