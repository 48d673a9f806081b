"""What export and serving share about a deployed model, below both of them.

```
session.py     ONNX Runtime: the import that names the pip extras, and the one session opener
               (threads capped by the CPUs this process may use, no busy spinning)
metadata.py    the model's I/O names and the r2m metadata an exported file carries (parsing only)
preprocess.py  the eval transform as data (`Preprocessing`, numpy + PIL)
repository.py  the model repository's layout, read side: versions, the served one, batching
```
`r2m.export` writes what this package reads (ONNX files, the repository, config.pbtxt);
`r2m.serving` only reads it. Nothing here imports torch, `onnx`, `r2m.export` or `r2m.serving`,
so the ONNX server runs on numpy, PIL, ONNX Runtime and FastAPI alone (docs/architecture.md,
"Layers of export and serving").
"""
