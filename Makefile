# Every target installs what it needs into .venv first (Python >= 3.10 as `python3`, or PYTHON=...).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-heavy lint format clean docs bench bench-quick bench-throughput bench-sweep bench-predict bench-photos bench-gpu bench-64 bench-levers bench-search bench-search-8ep bench-pareto bench-serve browser engines utkface

$(STAMP): pyproject.toml
	@echo ">> creating $(VENV) and installing agecls with its dependencies (first time: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# A short pruned Optuna study of real training runs on the generated synthetic faces, then its report, which
# ends with the best model's checkpoint and the agecls-predict / agecls-serve commands that use it.
demo: $(STAMP)
	@out="$${AGECLS_OUTPUT_DIR:-$(CURDIR)/outputs}"; \
	echo ">> make demo: generates 2,000 synthetic faces, then runs an 8-trial Optuna study of real agecls"; \
	echo "   trainings on them (64 px, two trials at a time; the median pruner stops trials that trail), then"; \
	echo "   reports it. About 2 minutes on 2 idle CPU cores (more on busy ones): the status line estimates the"; \
	echo "   time left."; \
	echo "   Output: $$out/multiruns/<date>/<time>/trial-NNNN/ (each trial's process.log and checkpoints/),"; \
	echo "   the report in $$out/reports/demo/. Watch the runs live in MLflow from another terminal:"; \
	echo "     $(BIN)/mlflow ui --backend-store-uri sqlite:///$$out/mlflow.db   # then open http://127.0.0.1:5000"; \
	echo "     (in its sidebar choose Model training rather than GenAI, once, to see the runs table)"; \
	echo "   At the end: the best model's checkpoint and the agecls-predict and agecls-serve commands that use it."
	$(BIN)/agecls-train -m experiment=demo sweep=demo
	$(BIN)/agecls-report demo

# One real model of all three attributes from a UTKFace folder: experiment=utkface (a multitask CNN at 32 px,
# 8 epochs; 17 minutes on 2 busy CPU cores), registered in MLflow as agecls-utkface@best (the best finished run
# of the experiment), then the agecls-serve and agecls-predict commands that use it.
utkface: $(STAMP)
	@test -n "$(UTKFACE)" || { echo "UTKFACE is not set: make utkface UTKFACE=/path/to/UTKFace"; exit 2; }
	@test -d "$(UTKFACE)" || { echo "UTKFACE=$(UTKFACE): no such folder"; exit 2; }
	$(BIN)/agecls-train experiment=utkface "data.root=$(UTKFACE)"
	$(BIN)/agecls-register best_of=utkface

# Installs the system Chromium for the browser test and the cluster engines first when it can (apt-get as
# root); otherwise those tests skip, saying why. Then the package's layer contracts (import-linter,
# pyproject.toml), ruff's lint and format checks, then pytest (the `cluster` group included).
test: $(STAMP)
	@$(MAKE) --no-print-directory browser || echo ">> no Chromium: the browser upload test will skip"
	@$(MAKE) --no-print-directory engines || echo ">> no cluster engines: the -m cluster tests will skip"
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest -m "not heavy"

test-heavy: $(STAMP)
	$(BIN)/python -m pytest -m heavy

# The benchmark suite; each script rewrites its own section of BENCHMARKS.md (the levers rounds: of
# docs/BENCHMARKS-EARLIER.md). Data pipeline (cache vs per-epoch JPEG decoding; ../shared/data/utkface when
# present, else generated faces; a few minutes), framework overhead (agecls vs a plain PyTorch loop, generated
# faces; ~10 minutes on 2 loaded cores), quality on real UTKFace (the dissertation's settings vs agecls's
# recipe under one budget, 32 px, 1/3 of each split, ~12 minutes on 2 shared CPU cores; needs the UTKFace
# folder). A study against both at the same budget is make bench-search; make bench-sweep measures the pruner.
# agecls's recipe for the no-search quality runs: the levers that won on validation at each image size
# (docs/BENCHMARKS-EARLIER.md levers, BENCHMARKS.md quality): OneCycle to 1e-3 won for age and gender at
# 32 px, and for gender only at 64 px (it lost for age there).
SHARED := --agecls-set callbacks.ema.enabled=true callbacks.ema.decay=0.995 augment.tta=auto
RECIPE := $(SHARED) --agecls-set-age scheduler=onecycle optimizer.lr=1e-3 \
	--agecls-set-gender scheduler=onecycle optimizer.lr=1e-3
RECIPE_64 := $(SHARED) --agecls-set-gender scheduler=onecycle optimizer.lr=1e-3
bench: $(STAMP)
	$(BIN)/python bench/data_pipeline.py --write docs/BENCHMARKS-EARLIER.md
	$(BIN)/python bench/overhead.py --notes bench/results/overhead-notes.md --write docs/BENCHMARKS-EARLIER.md
	nice -n 10 $(BIN)/python bench/quality.py --size 32 --stride 3 --fraction 0.5 --budget 16 --no-search \
	  --set data.pipeline=device $(RECIPE) --notes bench/results/quality-32px-recipe-notes.md --write BENCHMARKS.md

# CI smoke of the overhead, quality and throughput benches on tiny generated data (a few minutes; BENCHMARKS.md
# untouched).
bench-quick: $(STAMP)
	AGECLS_OUTPUT_DIR=$${TMPDIR:-/tmp}/agecls-bench-quick $(BIN)/python bench/overhead.py --quick
	AGECLS_OUTPUT_DIR=$${TMPDIR:-/tmp}/agecls-bench-quick $(BIN)/python bench/quality.py --quick
	AGECLS_OUTPUT_DIR=$${TMPDIR:-/tmp}/agecls-bench-quick $(BIN)/python bench/throughput.py --quick
	AGECLS_OUTPUT_DIR=$${TMPDIR:-/tmp}/agecls-bench-quick $(BIN)/python bench/trials.py --parts overhead --quick
	AGECLS_OUTPUT_DIR=$${TMPDIR:-/tmp}/agecls-bench-quick $(BIN)/python bench/levers.py --quick

# On a machine with a CUDA GPU and this checkout installed: the prepared GPU check (bench/gpu.sh, under 10
# minutes), then its throughput table into BENCHMARKS.md. Through the `device` tool see bench/gpu_prepare.sh.
bench-gpu: $(STAMP)
	bash bench/gpu.sh
	$(BIN)/python bench/throughput.py --from-json outputs/bench/gpu/throughput.json --write BENCHMARKS.md

lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

# docs/CONFIG.md, the configuration reference, regenerated from the YAML files of conf/ (tests/test_docs.py
# fails while the committed page is out of date).
docs: $(STAMP)
	$(BIN)/python docs/gen_config_reference.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Pruned vs unpruned Optuna study on the synthetic faces (about 20 minutes on 2 CPU cores); rewrites its
# BENCHMARKS.md section.
bench-sweep: $(STAMP)
	$(BIN)/python bench/sweep_pruning.py --write docs/BENCHMARKS-EARLIER.md

# What a study spends outside its trials' training: per-trial overhead (template vs fresh processes), a 50-trial
# study against a plain in-process Optuna loop, and trials per hour on real data (auto vs float32; needs
# UTKFace). About 15 minutes on 2 idle CPU cores.
bench-throughput: $(STAMP)
	$(BIN)/python bench/trials.py --write BENCHMARKS.md


# Quality levers per task on validation (bench/levers.py: the dissertation's recipe plus each lever, whole UTKFace
# split, 32 px, 8 half-epochs, and the dissertation's hierarchies V15/V16 for age; about 45 minutes on 2 CPU
# cores); rewrites its section of docs/BENCHMARKS-EARLIER.md.
bench-levers: $(STAMP)
	nice -n 5 $(BIN)/python bench/levers.py --notes bench/results/levers-notes.md --write docs/BENCHMARKS-EARLIER.md

# Search vs hand recipe at the same budget (bench/search.py): per task and bench seed, the dissertation's
# settings and agecls's hand recipe each trained on seeds (the best on validation), and an Optuna study over
# sweep=optuna_recipe (warm starts, successive halving, a pruned trial continued, the top trials re-seeded), the
# same epochs each; real UTKFace from AGECLS_UTKFACE or ../shared/data/utkface (refused without it); test read
# once per cell, paired bootstrap against the recipe. Sized for 2 CPU cores: 1 row in 3 of each split at 32 px,
# runs of 4 epochs, 32 epochs per side, 2 runs at a time: about 30 minutes per task and seed, 4.5 hours in all.
# It resumes: each finished task and seed is kept in SEARCH_OUT, so the same command run again (or with
# SEARCH_TASKS=gender) goes on where it stopped and rewrites the section with every cell done so far.
# On a GPU machine: SEARCH_SIZE='--stride 1 --budget-epochs 64 --run-epochs 8' SEARCH_ARGS='--device gpu
# --parallel 4' SEARCH_OUT=outputs/bench/search/gpu (4 runs or trials share the GPU).
SEARCH_TASKS ?= age,gender,ethnicity
SEARCH_SIZE ?= --stride 3 --budget-epochs 32 --run-epochs 4
# (cpu-stride3-w: studies whose warm starts run to the end; cpu-stride3 holds the earlier ones, which pruned them)
SEARCH_OUT ?= outputs/bench/search/cpu-stride3-w
SEARCH_ARGS ?= --parallel 2
bench-search: $(STAMP)
	nice -n 10 $(BIN)/python bench/search.py --size 32 --tasks $(SEARCH_TASKS) --seeds 3 $(SEARCH_SIZE) \
	  --reseed-top 2 --reseed-seeds 1 --check-pruned 1 --study-set optuna.pruner.min_resource=2 \
	  --out $(SEARCH_OUT) $(SEARCH_ARGS) --notes bench/results/search-notes.md --write BENCHMARKS.md

# The same comparison with runs twice as long (8 epochs, 64 per side) and the sweep's own rungs (epochs 3 and
# 6), in its own section (search-8ep): does the recipe's lead, chosen at 4-epoch budgets, hold at 8? The study
# spends one run of its budget on a third seed of its leader (optuna.reseed.leader_seeds). 20 (gender) to 40-50
# (age, ethnicity) minutes per task and seed on 2 cores; SEARCH_TASKS as above.
bench-search-8ep: $(STAMP)
	nice -n 10 $(BIN)/python bench/search.py --size 32 --tasks $(SEARCH_TASKS) --seeds 3 --stride 3 \
	  --budget-epochs 64 --run-epochs 8 --reseed-top 2 --reseed-seeds 1 --leader-seeds 1 --check-pruned 1 \
	  --parallel 2 --out outputs/bench/search/cpu-stride3-8ep-leader --section search-8ep \
	  --notes bench/results/search-8ep-notes.md --write BENCHMARKS.md

# A Pareto study for age (bench/pareto.py): validation macro-F1 against the ethnicity gap, sweep=pareto_fairness
# on 1 row in 3 of each split of real UTKFace at 32 px, 12 trials of 8 half-epochs, 2 at a time (about 35
# minutes on 2 CPU cores); the fairest front point against the best-F1 trial on test, paired bootstrap.
# Rewrites its BENCHMARKS.md section.
bench-pareto: $(STAMP)
	nice -n 5 $(BIN)/python bench/pareto.py --trials 12 --epochs 8 --jobs 2 \
	  --notes bench/results/pareto-age-32px-notes.md --write BENCHMARKS.md

# The recipe comparison at 64 px (about 45 minutes on 2 CPU cores; needs the UTKFace folder); rewrites its
# section of docs/BENCHMARKS-EARLIER.md.
bench-64: $(STAMP)
	nice -n 10 $(BIN)/python bench/quality.py --size 64 --stride 3 --fraction 0.5 --budget 16 --no-search \
	  --set data.pipeline=device $(RECIPE_64) --notes bench/results/quality-64px-recipe-notes.md \
	  --write docs/BENCHMARKS-EARLIER.md

# agecls-predict latency per stage (decode, detect, preprocess, model) for one photo and a batch of 32, CPU,
# dissertation-size untrained model (a few minutes); rewrites its BENCHMARKS.md section.
bench-predict: $(STAMP)
	nice -n 10 $(BIN)/python bench/predict_latency.py --write docs/BENCHMARKS-SERVING.md

# Faces in photos against the same faces as crops (bench/photos.py): 400 faces of the test split of the model
# `make utkface` registered, pasted into composed photos; recall, extra boxes, macro-F1 of both paths with
# paired bootstrap intervals, for MTCNN with and without alignment and Haar (~30 minutes on 2 CPU cores).
bench-photos: $(STAMP)
	$(BIN)/python bench/photos.py --notes bench/results/photos-notes.md --write BENCHMARKS.md

# agecls-serve under load: the real server on 127.0.0.1 gets 50 uploads at the pixel limits from 20 clients at
# once (bench/serve_load.py; about a minute); rewrites its BENCHMARKS.md section.
bench-serve: $(STAMP)
	$(BIN)/python bench/serve_load.py --notes bench/results/serve-load-notes.md --write docs/BENCHMARKS-SERVING.md

# The system Chromium that tests/test_serve.py drives through Playwright (never `playwright install`):
# apt-get as root on Debian/Ubuntu. Without it the browser test skips, saying so.
browser:
	@if [ -x /usr/bin/chromium ]; then echo "chromium present: /usr/bin/chromium"; \
	elif command -v apt-get >/dev/null; then apt-get install -y chromium || (apt-get update && apt-get install -y chromium); \
	else echo "install Chromium with your package manager, or set AGECLS_CHROMIUM=/path/to/chromium"; exit 1; fi

# The engines that tests/engines.py starts for `pytest -m cluster`: a one-node Slurm cluster (slurmctld,
# slurmd, munge; slurmdbd on MariaDB so that sacct answers) and a PostgreSQL server; apt-get as root on
# Debian/Ubuntu. The MLflow server, psycopg and optuna-dashboard come from .venv ('.[dev]'). Without them
# the cluster tests skip, saying why.
ENGINE_PROGRAMS := munged slurmctld slurmd slurmdbd sbatch sacct mariadbd mariadb-install-db
ENGINE_PACKAGES := slurm-wlm slurmdbd munge mariadb-server
engines:
	@missing=""; for p in $(ENGINE_PROGRAMS); do \
	  command -v $$p >/dev/null || [ -x /usr/sbin/$$p ] || missing="$$missing $$p"; done; \
	pkgs="$(ENGINE_PACKAGES)"; \
	if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  missing="$$missing initdb"; pkgs="$$pkgs postgresql"; fi; \
	if [ -z "$$missing" ]; then echo "engines present: Slurm, slurmdbd, munge, MariaDB, PostgreSQL"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "missing:$$missing; installing them needs root and apt-get (packages: $$pkgs)"; exit 1; \
	else export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends $$pkgs || \
	  (apt-get update && apt-get install -y --no-install-recommends $$pkgs); fi
