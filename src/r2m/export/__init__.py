"""Export and publishing: the merged detector as one checked ONNX graph, its int8 challenger,
and the Triton-layout model repository the server reads (SPEC section 8).

Modules: `metadata` (I/O names, metadata, checks; no torch), `onnx_export` (export + parity),
`quantize` (int8 challenger), `publish` (atomic versions + config.pbtxt).
"""
