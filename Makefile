# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# torch is pinned: this version is the CPU build; an unpinned torch pulls several GB of CUDA libraries.
TORCH := torch==2.13.0

.PHONY: demo test bench model clean mutate

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' '$(TORCH)'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/onnxcomp inspect models/digits_cnn.onnx --top 5
	$(BIN)/onnxcomp optimize models/digits_cnn.onnx --data models/digits_test.npz

test: $(INSTALLED)
	$(BIN)/python -m pytest -q

# Comparisons with peer tools on the shared assets (ONNXCOMP_ASSETS, else ../shared/assets); see benchmarks/README.md.
bench: $(INSTALLED)
	$(BIN)/python benchmarks/fuse_bn_vs_onnxoptimizer.py
	$(BIN)/python benchmarks/int8_vs_ort.py
	$(BIN)/python benchmarks/prune_vs_naive.py
	$(BIN)/python benchmarks/deep_compression.py
	$(BIN)/python benchmarks/distill_digits.py
	$(BIN)/python benchmarks/zoo.py
	$(BIN)/python benchmarks/transformers.py

# Mutation check, outside CI: break named features one at a time in a temporary copy and run their tests
# (tests/mutate.py; --only NAME to pick some). Lists the mutants that survived. The core's mutation score:
# make mutate MUTATE="--random 60 --seed 1207 --json mutants.json" draws 60 seeded random mutants of onnxcomp/
# and passes/ and runs each against its module's fast tests (about 20 minutes on 2 cores).
mutate: $(INSTALLED)
	ONNXCOMP_ASSETS=$${ONNXCOMP_ASSETS:-../shared/assets} $(BIN)/python tests/mutate.py $(MUTATE)

# Retrain the demo model from scikit-learn's digits (deterministic; rewrites models/digits_*).
model: $(INSTALLED)
	$(BIN)/python models/train_digits.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache models/*.opt.onnx
