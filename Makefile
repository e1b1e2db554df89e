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
	$(BIN)/pip install --quiet -e '.[dev,onnx]'
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
	$(BIN)/python -m lthmaml.edge.pi --config configs/edge/pi.yaml --artifact "$(ARTIFACT)" --task "$(TASK)"

# Plots and a Markdown table of pruning runs: metric vs weights remaining, per-round best epoch and
# wall time, validation metric vs time, per-layer sparsity (see lthmaml/reporting/report.py). Without RUNS:
# the experiments' report and docs/results.md (the `results` target below).
RUNS ?=
OUT ?= report
.PHONY: report
report: $(STAMP)
ifeq ($(strip $(RUNS)),)
	$(MAKE) --no-print-directory results
else
	$(BIN)/python -m lthmaml.reporting.report $(RUNS) -o $(OUT)
endif

# The evidence behind docs/results.md (configs/experiments/, each stacked on base.yaml): the
# lottery-ticket family, Powerprop, meta-gradient and Taylor pruning and the dense reference, on the
# shared Omniglot subset, each level trained to its validation plateau, plus the sinusoid table
# (bench/sinusoid.py, 20000 iterations). About 8 CPU-core hours in all (a lottery experiment 1.3,
# dense 0.3, the sinusoid 0.5); `make -j2 experiments` runs two at a time, about 4 hours, and may
# be stopped and run again across sittings. Each writes $(EXP_DIR)/<name>/version_0 and
# logs/<name>.log; a killed one resumes from its last.ckpt when run again, a finished one is
# skipped (<name>.done; the sinusoid, MAML's table beside the CNP's and their plot: its JSON exists).
EXP_DIR ?= runs/experiments
EXP_ARGS ?=  # extra CLI overrides for every experiment, e.g. --data.init_args.root DIR
# Committed: each finished experiment's records (no weights), what `results` reads.
EVIDENCE ?= docs/results/evidence
archive = $(BIN)/python -m lthmaml.reporting.archive $(EXP_DIR)/$(1)/version_0 $(EVIDENCE)/$(1)/version_0
SINUSOID ?= $(EVIDENCE)/sinusoid.json
EXPERIMENTS := lth_rewind_init lth_late_rewind lth_random_reinit powerprop_lottery metagrad taylor dense
.PHONY: experiments results
experiments: $(EXPERIMENTS:%=$(EXP_DIR)/%.done) $(SINUSOID)

$(SINUSOID): | $(STAMP)
	$(BIN)/python -m bench.sinusoid --threads 1 --json $@ --plot $(RESULTS)/sinusoid_predictions.png

$(EXP_DIR)/lth_random_reinit.done: $(EXP_DIR)/lth_rewind_init.done  # it trains lth_rewind_init's masks

# fit_experiment: fit $(1) (a run name under $(EXP_DIR)) from config $(2) plus arguments $(3), stacked
# on $(4) (default: configs/experiments/base.yaml); it resumes from the run's last.ckpt, refuses a
# folder without one, archives the records, stamps $@.
define fit_experiment
	@mkdir -p $(EXP_DIR)/logs
	@last=$(EXP_DIR)/$(1)/version_0/checkpoints/last.ckpt; resume=; \
	if [ -f $$last ]; then echo "experiments: resuming $(1) from $$last"; resume="--ckpt_path $$last"; \
	elif [ -e $(EXP_DIR)/$(1) ]; then \
	  echo "experiments: $(EXP_DIR)/$(1) exists but has no last.ckpt: move it away and run again" >&2; exit 1; fi; \
	echo "experiments: $(1) (log: $(EXP_DIR)/logs/$(1).log)"; \
	OMP_NUM_THREADS=1 $(BIN)/lthmaml fit -c $(or $(4),configs/experiments/base.yaml) -c $(2) \
	  --trainer.logger.init_args.save_dir $(EXP_DIR) --trainer.logger.init_args.name $(1) $(3) \
	  $(EXP_ARGS) $$resume >> $(EXP_DIR)/logs/$(1).log 2>&1
	@$(call archive,$(1)) >> $(EXP_DIR)/logs/$(1).log
	@touch $@
endef

$(EXP_DIR)/%.done: configs/experiments/%.yaml configs/experiments/base.yaml | $(STAMP)
	$(call fit_experiment,$*,$<,$(if $(filter lth_random_reinit,$*),--trainer.callbacks.init_args.masks_from $(EXP_DIR)/lth_rewind_init/version_0))

# <experiment>_rerun: the experiment again under another name, to see whether this machine
# reproduces it (float rounding differs between hosts; runs on one trajectory compare cleanly).
REPEATS := lth_rewind_init_rerun
$(EXP_DIR)/%_rerun.done: configs/experiments/%.yaml configs/experiments/base.yaml | $(STAMP)
	$(call fit_experiment,$*_rerun,$<,)

# Always-sparse training on the same protocol (configs/experiments/sparse/<method>.yaml, issue #11):
# static, SNIP, SET, RigL, Top-KAST and Powerprop + Top-KAST, each at sparsity 0.8, 0.9 and 0.95,
# trained from the first update to the dense run's plateau rule, its best validation tested on the
# 600 meta-test tasks; runs/experiments/sparse_<method>_<level>. 14-44 minutes each on
# one core (measured), about 7 core-hours in all; plus lth_distill (the lottery with distillation,
# 2.1). `make -j2 sparse-experiments` resumes like `make experiments`.
SPARSE_METHODS := static snip set rigl topkast powerprop_topkast
SPARSE_LEVELS := 80 90 95
SPARSE_RUNS := $(foreach m,$(SPARSE_METHODS),$(foreach l,$(SPARSE_LEVELS),sparse_$(m)_$(l)))
.PHONY: sparse-experiments
sparse-experiments: $(SPARSE_RUNS:%=$(EXP_DIR)/%.done) $(EXP_DIR)/lth_distill.done

# lth_rewind_init with distillation from its round 0 (configs/experiments/sparse/lth_distill.yaml).
$(EXP_DIR)/lth_distill.done: configs/experiments/sparse/lth_distill.yaml configs/experiments/base.yaml | $(STAMP)
	$(call fit_experiment,lth_distill,$<,)

# sparse_<method>_<level>: configs/experiments/sparse/<method>.yaml at sparsity 0.<level>.
sparse_level = $(lastword $(subst _, ,$(1)))
$(EXP_DIR)/sparse_%.done: configs/experiments/base.yaml | $(STAMP)
	$(call fit_experiment,sparse_$*,configs/experiments/sparse/$(patsubst %_$(call sparse_level,$*),%,$*).yaml,--trainer.callbacks.init_args.sparsity 0.$(call sparse_level,$*))

# The supervised ResNet-18 lottery (configs/experiments/supervised/resnet18_lottery.yaml stacked on
# configs/supervised_resnet18.yaml): 8 rounds of 20% to 83% sparsity on the Omniglot subset (CIFAR-10
# cannot be fetched here), every level tested with its 95% CI beside the dense round 0; sized for
# about an hour of one core. It resumes like `make experiments`; then
# `make report RUNS=$(EXP_DIR)/resnet18_lottery/version_0` plots and tabulates it.
.PHONY: resnet18-lottery
resnet18-lottery: $(EXP_DIR)/resnet18_lottery.done
$(EXP_DIR)/resnet18_lottery.done: configs/experiments/supervised/resnet18_lottery.yaml configs/supervised_resnet18.yaml | $(STAMP)
	$(call fit_experiment,resnet18_lottery,$<,,configs/supervised_resnet18.yaml)

# docs/results.md: the report of the finished experiments (plots and tables under $(RESULTS)) and
# the sinusoid table of bench/sinusoid.py, written into $(RESULTS_DOC) between its results markers.
# It reads the records archived under $(EVIDENCE) (lthmaml/reporting/archive.py: config, events and
# round metrics, no weights), which every finished experiment writes, so experiments finished at
# different times or on different machines make one table; those not finished yet are named.
RESULTS ?= docs/results
RESULTS_DOC ?= docs/results.md
ALL_EXPERIMENTS = $(EXPERIMENTS) $(REPEATS) $(SPARSE_RUNS) lth_distill
FINISHED = $(strip $(foreach e,$(ALL_EXPERIMENTS),$(wildcard $(EVIDENCE)/$(e)/version_0)))
PENDING = $(strip $(foreach e,$(ALL_EXPERIMENTS),$(if $(wildcard $(EVIDENCE)/$(e)/version_0),,$(e))))
.PHONY: archive
archive: | $(STAMP)  # refresh the archive of every experiment finished in $(EXP_DIR)
	@for e in $(ALL_EXPERIMENTS); do if [ -f $(EXP_DIR)/$$e.done ]; then $(call archive,$$e); fi; done
results: archive | $(STAMP)
	$(if $(FINISHED),,@echo "results: no finished experiment under $(EVIDENCE): run make experiments first" >&2; exit 1)
	$(BIN)/python -m lthmaml.reporting.report $(FINISHED) -o $(RESULTS) \
	  $(if $(wildcard $(SINUSOID)),--sinusoid $(SINUSOID)) $(if $(PENDING),--pending $(PENDING)) --readme $(RESULTS_DOC)

# A separate venv (.venv-peers) with the peer libraries bench/peers.py compares against: learn2learn
# 0.2.0 (built from its sdist, Cython files regenerated), torchopt 0.7.3 and easyfsl 1.5.0 (with
# torchvision 0.28.0 without its dependencies). None of them is a project or test dependency.
.PHONY: bench-peers-setup
bench-peers-setup:
	PYTHON=$(PYTHON) bash bench/peers_setup.sh
