"""Text forms shared by curation and the labelled tasks: one definition of what "the same text" means."""

from __future__ import annotations

import re
import unicodedata


_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The form two texts are compared in (exact duplicates in curation, the split key and the
    train/test overlap of a labelled task): NFKC, lowercase, whitespace collapsed."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().lower()
