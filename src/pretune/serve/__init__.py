"""`pretune serve`: a local web page and JSON API over loaded runs (fill-mask, streamed generation,
classification, embedding similarity, the cost planner, a run's live curves). FastAPI + uvicorn,
the `[serve]` extra; `cli.py` loads neither until the verb runs."""
