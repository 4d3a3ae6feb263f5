"""Text in, token shards out: the built-in corpus (sources.py, corpora.py), curation (curate.py),
the shards (prepare.py) and their batch loaders (loaders.py); labelled tasks (labelled.py,
encoding.py); load_tokenizer (tokenizers.py)."""
