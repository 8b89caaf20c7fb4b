# Two commands, each doing its own setup on a fresh machine:
#   make demo   local Kafka broker + one worker + a simulated incident scenario, alerts live, a summary
#   make test   the whole test suite, integration tests on a real Kafka broker included
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench kafka-start kafka-stop clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "soundcheck needs Python 3.11 (set PYTHON=python3.11)")'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/soundcheck demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/soundcheck bench

kafka-start: $(STAMP)
	$(VENV)/bin/soundcheck kafka start

kafka-stop: $(STAMP)
	$(VENV)/bin/soundcheck kafka stop

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
