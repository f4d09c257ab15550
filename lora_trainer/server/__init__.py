"""The HTTP API and the persistent job queue, written against `Host`.

`queue.py` (the queue the tab and the API share, on the process's `JobRunner`), `specs.py` (what a queued job
does, as JSON), `paths.py` (paths given over HTTP, confined to the datasets and Lora folders) and `routes.py`
(the FastAPI routes; the only module that imports FastAPI, so the command line works without it).
"""
