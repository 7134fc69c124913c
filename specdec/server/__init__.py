"""``specdec serve``: an OpenAI-compatible streaming HTTP server on the step engine.

One concept per module: :mod:`.router` (per-request drafters over one engine), :mod:`.engine_loop` (the thread that
owns the engine), :mod:`.detok` (incremental detokenization and stop strings), :mod:`.metrics` (Prometheus),
:mod:`.protocol` (request validation, OpenAI-style errors), :mod:`.responses` (response bodies and SSE chunks),
:mod:`.openai_api` (the FastAPI app), :mod:`.cmd_serve` (the CLI command and clean shutdown).

This package's ``__init__`` imports nothing, so ``specdec --help`` stays fast.
"""
