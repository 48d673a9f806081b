"""Export and publishing: the merged detector as one checked ONNX graph, its int8 challenger,
and the Triton-layout model repository the server reads (deploy/README.md).

Modules: `metadata` (setting and reading the r2m metadata, file checks; no torch), `onnx_export`
(export + parity), `quantize` (int8 challenger), `publish` (atomic versions + config.pbtxt).
What serving needs of these (I/O names, metadata parsing, the repository's read side, ONNX
Runtime sessions, the eval transform) lives below both, in `r2m.runtime`.
"""
