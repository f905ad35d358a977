"""The OpenAI-compatible HTTP server over a `JanusFlowRuntime` (FastAPI + uvicorn) and its Ray Serve application.

Needs the `serve` extra (`pip install jfexport[serve]`). Imports no model code: the runtime and
its engines folder are the whole contract.
"""
