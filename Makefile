# The two commands a fresh machine needs (see README.md):
#   make run   - set up (first time) and start the app
#   make test  - set up (first time) and run the test suite
PY := .venv/bin/python
ARGS ?=

.PHONY: run test setup

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) app.py $(ARGS)

test: setup
	@bash scripts/setup_browser.sh
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q $(ARGS)
