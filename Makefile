# The README's two commands: `make test` and `make demo`. Each creates .venv/ (if missing) and
# installs the pinned stack into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vild_d2-installed

.PHONY: test demo ablation serve install clean
.DEFAULT_GOAL := test

install: $(STAMP)

# The runtime (runtime/, its own distribution vild-d2-runtime) first: vild_d2 requires it.
$(STAMP): requirements.lock setup.py runtime/pyproject.toml tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==24.3.1"
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --no-deps --no-build-isolation -e runtime
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The linter and formatter check first (pyproject.toml), then the whole suite in two workers
# (pytest-xdist; a file's tests stay together, so its module fixtures are built once).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The shapes world end to end (demo/run_shapes.py): world, tiny CLIP teacher, base RPN,
# proposals, CLIP targets, ViLD-ensemble, LVIS evaluation, picture. Stages are cached.
demo: $(STAMP)
	$(PY) demo/run_shapes.py demo

# The paper's ablation in miniature on the same world: output/shapes/ablation.{json,md}.
# ABLATION adds options, e.g. the unseen-concept world over 3 seeds (issue 31, docs/SHAPES.md):
#   make ablation ABLATION="--world unseen --seeds 0,1,2"  -> output/shapes_unseen/ablation_seeds.md
ABLATION ?=
ablation: $(STAMP)
	$(PY) demo/run_shapes.py ablation $(ABLATION)

# The page and JSON API (tools/serve.py) for the model `make demo` trained: open
# http://127.0.0.1:7860/ (docs/SERVING.md).
SHAPES_MODEL := output/shapes/vild_ensemble/model_final.pth
serve: $(STAMP)
	@test -f $(SHAPES_MODEL) || { echo "no $(SHAPES_MODEL): run 'make demo' first" >&2; exit 2; }
	$(PY) tools/serve.py --config-file configs/Shapes/vild_ensemble.yaml \
		MODEL.WEIGHTS $(SHAPES_MODEL)

clean:
	rm -rf $(VENV) output build *.egg-info
