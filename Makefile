# Two commands do all set-up on a fresh machine: `make speedrun` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: speedrun chat test venv bench lock clean

# constraints.txt pins every package to the versions the tests last passed with (reproducible installs);
# `make lock` refreshes it to the newest versions pyproject.toml allows.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: the CPU build, installed from the machine's local wheel
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e '.[test]'
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^llmlab' > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	rm -rf .lock-venv

venv: $(STAMP)

speedrun: $(STAMP)
	$(BIN)/llmlab speedrun --out runs/speedrun --force

chat: $(STAMP)
	$(BIN)/llmlab pull smollm2
	$(BIN)/llmlab chat

test: $(STAMP)
	bash scripts/system-deps.sh  # Debian's chromium, for the web-chat browser test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
