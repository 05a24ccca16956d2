"""`aml serve`: an HTTP search service over an `aml index` (or its Milvus copy) for asymmetric retrieval.

`keys` (API keys, hashed), `backend` (the searched index and the generation watcher), `app` (the FastAPI
application: /search, /search/image, /info, /healthz, the page at /, database images under /images/).
"""
