"""`dimple-serve`: an OpenAI-compatible server for Dimple on LitServe.

    server.py       the command line and the LitServer (the architecture is described there)
    worker.py       the inference worker: requests -> rows of a batch -> settled text
    openai_spec.py  the HTTP side: OpenAI's routes, Dimple's settings, usage, /v1/models, /metrics
    request.py  messages.py  errors.py  state.py   the request body, its messages and images, errors, shared state
    process.py  load.py                             a server in a subprocess, and the load test
"""

try:
    import litserve  # noqa: F401
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        f"dimple-serve needs the `serve` extra (LitServe): pip install -e '.[serve]' ({error})"
    ) from error
