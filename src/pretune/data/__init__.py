"""Text in, token shards out: the built-in corpus (corpora.py) and the shards and
their batch loaders (shards.py)."""
