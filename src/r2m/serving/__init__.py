"""Serving: the published ONNX model config.pbtxt names (the champion) over HTTP with ONNX Runtime (SPEC section 8).

Modules: `preprocess` (the eval transform from the model's metadata), `model_store` (sessions
and hot reload), `app` (FastAPI routes), `server` (`run_server`, used by `r2m serve` and
`python -m r2m.serving`).
"""
