# gaze-edge: every target sets up .venv itself (pinned versions in requirements.lock).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint train evaluate plugins kernels-cpu clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

## The main job on the built-in default model: export it to ONNX (validated against PyTorch), then caption
## generated scenes with the torch-free runtime, streaming tokens and drawing a gaze map per scene.
DEMO := out/demo
demo: setup
	$(VENV)/bin/gaze scenes -o $(DEMO)/scenes --count 3
	test -f $(DEMO)/gaze-tiny/decoder.onnx || \
		$(VENV)/bin/gaze export checkpoints/gaze-tiny -o $(DEMO)/gaze-tiny --gaze-map-outputs --max-seq-len 256
	@for i in 0 1 2; do \
		echo "--- $(DEMO)/scenes/scene_$$i.png (truth: $$(sed -n "$$((i+1))p" $(DEMO)/scenes/truth.txt | cut -f2))"; \
		$(VENV)/bin/gaze caption $(DEMO)/gaze-tiny $(DEMO)/scenes/scene_$$i.png \
			--gaze-map $(DEMO)/gaze_map_$$i.png || exit 1; \
	done
	$(VENV)/bin/gaze profile $(DEMO)/gaze-tiny --max-new-tokens 32 --repeats 3
	@echo "gaze maps: $(DEMO)/gaze_map_*.png"

test: setup
	$(PY) -m pytest -q -rs

test-fast: setup
	$(PY) -m pytest -q -rs -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy gaze_edge model export runtime calibrate

## Re-train the shipped tiny checkpoints and evaluate them on held-out scenes (about 45 min on 2 shared cores).
## The paper's family in miniature: SigLIP-style tower, Qwen3-style decoder, 64 px scenes of 1-4 objects on a
## 4x4 grid, 16 regions, 4 own_image context tokens (model/train.py tiny_config). Stage 1: a dense model
## (900 steps at lr 2e-3, then 1200 more at lr 1e-3). Stage 2, both from stage 1 with the same schedule
## (400 steps): the gaze model at top_k 2 of 16 regions, and the dense twin at top_k 16 (same total training).
STAGE2 := --steps 400 --lr 5e-4 --warmup 20 --seed 1
train: setup
	mkdir -p runs
	$(PY) -m gaze_edge.model.train --out runs/dense-stage1 --dense --steps 900
	$(PY) -m gaze_edge.model.train --out runs/dense-stage1b --dense --init-from runs/dense-stage1 \
		--steps 1200 --lr 1e-3 --warmup 50 --seed 2
	$(PY) -m gaze_edge.model.train --out checkpoints/gaze-tiny-dense --dense --init-from runs/dense-stage1b $(STAGE2) \
		> runs/dense-twin.train.log 2>&1 & \
	$(PY) -m gaze_edge.model.train --out checkpoints/gaze-tiny --init-from runs/dense-stage1b $(STAGE2) \
		--top-k 2 --dense-frac 0 --shrink-end-frac 0; \
	wait
	$(MAKE) evaluate

evaluate: setup
	$(VENV)/bin/gaze evaluate checkpoints/gaze-tiny --json checkpoints/gaze-tiny/eval.json \
		--gaze-map docs/figures/gaze_examples.png
	$(VENV)/bin/gaze evaluate checkpoints/gaze-tiny-dense --json checkpoints/gaze-tiny-dense/eval.json

## CUDA kernels + C ABI (always) and the TensorRT plugin (where TensorRT is found: TensorRT_ROOT=...).
plugins:
	cmake -S plugins_trt -B build/plugins_trt -DCMAKE_BUILD_TYPE=Release
	cmake --build build/plugins_trt -j2

## The same kernels compiled as C++ for the CPU execution harness (g++ and the CUDA headers; no nvcc, no GPU):
## build/kernels-cpu/libgaze_kernels_cpu.so. The kernel tests build it themselves when it is missing.
kernels-cpu:
	cmake -S plugins_trt/cpu_harness -B build/kernels-cpu -DCMAKE_BUILD_TYPE=Release
	cmake --build build/kernels-cpu -j2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
