# gaze-edge: every target sets up .venv itself (pinned versions in requirements.lock).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint train evaluate clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

## The main job on the built-in default model: caption generated scenes.
demo: setup
	$(VENV)/bin/gaze demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy gaze_edge model export runtime calibrate

## Re-train the shipped tiny checkpoints (gaze and its dense twin, in parallel, ~15 min on 2 cores)
## and evaluate them on held-out scenes.
train: setup
	$(PY) -m gaze_edge.model.train --out checkpoints/gaze-tiny-dense --dense > dense-twin.train.log 2>&1 & \
	$(PY) -m gaze_edge.model.train --out checkpoints/gaze-tiny; \
	wait
	$(MAKE) evaluate

evaluate: setup
	$(VENV)/bin/gaze evaluate checkpoints/gaze-tiny --json checkpoints/gaze-tiny/eval.json
	$(VENV)/bin/gaze evaluate checkpoints/gaze-tiny-dense --json checkpoints/gaze-tiny-dense/eval.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
