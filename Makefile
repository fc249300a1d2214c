# Quick start: `make serve` (set up + start the server and browser demo), `make test` (set up + lint + tests).
HOST ?= 127.0.0.1
PORT ?= 8765
VENV := .venv/bin

.PHONY: serve test setup lint pytest

setup:
	scripts/setup.sh

serve:
	scripts/setup.sh
	$(VENV)/voicefast serve --host $(HOST) --port $(PORT)

test:
	scripts/setup.sh test
	$(VENV)/ruff check .
	$(VENV)/python -m pytest -q
