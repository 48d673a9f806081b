"""Serving: the published ONNX model config.pbtxt names (the champion) over HTTP with ONNX Runtime.

Modules: `model_store` (sessions and hot reload), `batching` (concurrent requests scored in one
session call, as config.pbtxt's dynamic batching says), `app` (FastAPI routes and the request
body's limits), `server` (`run_server`, used by `r2m serve` and `python -m r2m.serving`).
Serving imports neither torch nor `r2m.export`: what it shares with export is `r2m.runtime`
(docs/architecture.md, "Layers of export and serving"), and images are decoded by
`r2m.data.images` (PIL).
"""
