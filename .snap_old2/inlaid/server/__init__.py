"""inlaid.server: the OpenAI-compatible HTTP API (FastAPI + uvicorn) over ``AsyncLLM``.

Entry points (import from the submodules; this package imports nothing eagerly):
- ``inlaid.server.app.build_app(async_llm, api_key=None, max_body_bytes=1 MiB)``
- ``inlaid.server.serve.run_server(engine_config, adapters, host, port, api_key)``
- ``inlaid.server.serve.serve_async_llm(async_llm, host, port, api_key)``
See docs/server.md for endpoints, the error-status rule and lifecycle choices.
"""
