#!/usr/bin/env bash
# GPU proof for issue 14: on a CUDA host, in under 8 minutes,
#   1. builds a small demo dataset and trains ONE specialist on CUDA with mixed precision (params.yaml
#      train.mixed_precision: true; bf16 where supported, else fp16 + GradScaler);
#   2. runs `r2m merge --method r2m --device cuda` on ViT-L/14-shaped synthetic checkpoints (N = 3)
#      and checks the output against `r2m merge --device cpu` on the same inputs;
#   3. exports the trained specialist to ONNX (`r2m export`, parity against torch on CPU) and scores
#      it with onnxruntime-gpu's CUDAExecutionProvider from ITS OWN venv (never beside onnxruntime),
#      comparing the scores with the CPU provider's;
#   4. writes a table of times to $OUT/gpu_check.md.
#
# Usage (repository root, project venv at .venv):
#   bench/gpu_check.sh                 # on the CUDA host
#   bench/gpu_check.sh --dry-run       # anywhere: CPU, 1 ViT-L block, no onnxruntime-gpu venv (checks the script)
# Environment: OUT (default bench/results/gpu_check), WORK (scratch, default a temp dir),
#   PY (default .venv/bin/python), DATA (an existing demo data root to reuse),
#   ORT_GPU_VENV (an existing venv holding onnxruntime-gpu; else one is created with
#   `pip install onnxruntime-gpu` + numpy, from ORT_GPU_WHEELS=<folder> with --no-index when given).
set -euo pipefail
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/gpu_check}
WORK=${WORK:-$(mktemp -d -t r2m-gpu-check-XXXX)}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd); WORK=$(cd "$WORK" && pwd)
export PYTHONPATH=${PYTHONPATH:-src} TQDM_DISABLE=1
TABLE="$OUT/gpu_check.md"
ROWS=()
step() {  # step NAME CMD...: run, time, record
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  echo "== $name" >&2
  "$@"
  local t1; t1=$(date +%s.%N)
  ROWS+=("| $name | $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') |")
}
if (( DRY )); then DEVICE=cpu; LAYERS=1; else DEVICE=cuda; LAYERS=""; fi
if (( ! DRY )); then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK/gpu.txt"
  "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device')"
fi

# -- 1. one specialist, trained on $DEVICE (mixed precision on CUDA) -----------------------------------
PARAMS="$WORK/params.yaml"
"$PY" - "$PARAMS" "$WORK" <<'PYEOF'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
work = sys.argv[2]
p["paths"].update({"artifacts": f"{work}/artifacts", "data_root": f"{work}/data", "mlflow_tracking_uri": f"sqlite:///{work}/mlflow.db", "mlflow_artifacts": f"{work}/mlartifacts"})
p["train"].update({"epochs": 1, "mixed_precision": True})
yaml.safe_dump(p, open(sys.argv[1], "w"))
PYEOF
if [[ -n "${DATA:-}" ]]; then DATA_ROOT=$DATA; else
  DATA_ROOT="$WORK/data"
  step "demo data (r2m demo-data, 64 images/class)" "$PY" -m r2m.cli demo-data --out "$DATA_ROOT" --size 64 --params "$PARAMS"
fi
GEN=$(dirname "$(grep -l "role: seen" "$DATA_ROOT"/*/generator.yaml | head -1)")  # a seen (trainable) dataset
step "train one specialist on $DEVICE (mixed precision: $([[ $DEVICE == cuda ]] && echo on || echo off, CPU))" \
  "$PY" -m r2m.cli train "$GEN" --out "$WORK/specialist.safetensors" --params "$PARAMS"

# -- 2. R²M at ViT-L/14 shapes, N = 3: CUDA vs CPU ---------------------------------------------------
step "ViT-L/14 synthetic checkpoints (N = 3${LAYERS:+, $LAYERS block})" "$PY" - "$WORK/vitl" "$LAYERS" <<'PYEOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
from merge_bench import make_checkpoints
from r2m.checkpoint import sidecar_path
from r2m.checkpoint import file_sha256
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
make_checkpoints("ViT-L-14", 3, folder, layers=int(sys.argv[2]) if sys.argv[2] else None)
sha = file_sha256(folder / "theta0.safetensors")
for i in range(3):
    sidecar_path(folder / f"spec{i}.safetensors").write_text(json.dumps({"theta0_sha256": sha}))
PYEOF
SPECS=(--specialist "$WORK/vitl/spec0.safetensors" --specialist "$WORK/vitl/spec1.safetensors" --specialist "$WORK/vitl/spec2.safetensors")
step "r2m merge --device $DEVICE (R²M, ViT-L/14, N = 3)" "$PY" -m r2m.cli merge --method r2m --pretrained "$WORK/vitl/theta0.safetensors" "${SPECS[@]}" --out "$WORK/merged-$DEVICE.safetensors" --device "$DEVICE" --quiet
if [[ $DEVICE != cpu ]]; then
  step "r2m merge --device cpu (same inputs)" "$PY" -m r2m.cli merge --method r2m --pretrained "$WORK/vitl/theta0.safetensors" "${SPECS[@]}" --out "$WORK/merged-cpu.safetensors" --device cpu --quiet
fi
"$PY" - "$WORK/merged-$DEVICE.safetensors" "$WORK/merged-cpu.safetensors" "$WORK/vitl/theta0.safetensors" > "$WORK/merge_check.txt" <<'PYEOF'
import sys
from safetensors.torch import load_file
a, b, t0 = (load_file(p) for p in sys.argv[1:4])
worst = 0.0
for k in b:
    if not b[k].is_floating_point():
        assert (a[k] == b[k]).all(), k
        continue
    if k not in t0:
        continue
    da, db = (a[k].double() - t0[k].double()), (b[k].double() - t0[k].double())
    worst = max(worst, float((da - db).norm() / max(float(db.norm()), 1e-30)))
print(f"max over keys of ‖Δθ_cuda − Δθ_cpu‖ / ‖Δθ_cpu‖ = {worst:.2e}")
assert worst < 1e-3, f"CUDA merge differs from the CPU merge: {worst:.2e}"
PYEOF
cat "$WORK/merge_check.txt"

# -- 3. ONNX export + scoring with onnxruntime-gpu in its own venv ------------------------------------
step "r2m export (ONNX + parity vs torch, CPU provider)" "$PY" -m r2m.cli export --model "$WORK/specialist.safetensors" --out "$WORK/model.onnx" --params "$PARAMS"
"$PY" - "$WORK/model.onnx" "$WORK/inputs.npy" "$WORK/scores-cpu.npy" <<'PYEOF'
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
inp = s.get_inputs()[0]
shape = [d if isinstance(d, int) else 8 for d in inp.shape]
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
np.save(sys.argv[2], x)
np.save(sys.argv[3], s.run(None, {inp.name: x})[0])
PYEOF
if (( DRY )); then
  ORT_PY="$PY"; PROVIDER=CPUExecutionProvider  # dry run: the project's CPU onnxruntime stands in
else
  if [[ -z "${ORT_GPU_VENV:-}" ]]; then
    ORT_GPU_VENV="$WORK/ort-gpu-venv"
    step "venv with onnxruntime-gpu (own environment)" bash -c "'$PY' -m venv '$ORT_GPU_VENV' && '$ORT_GPU_VENV/bin/pip' install -q ${ORT_GPU_WHEELS:+--no-index --find-links '$ORT_GPU_WHEELS'} onnxruntime-gpu numpy"
  fi
  ORT_PY="$ORT_GPU_VENV/bin/python"; PROVIDER=CUDAExecutionProvider
fi
step "score with onnxruntime ($PROVIDER)" "$ORT_PY" - "$WORK/model.onnx" "$WORK/inputs.npy" "$WORK/scores-cpu.npy" "$PROVIDER" > "$WORK/ort_check.txt" <<'PYEOF'
import sys, time, numpy as np, onnxruntime as ort
path, xs, ref, provider = sys.argv[1:5]
s = ort.InferenceSession(path, providers=[provider])
assert s.get_providers()[0] == provider, f"{provider} not used (providers: {s.get_providers()})"
x, want = np.load(xs), np.load(ref)
t = time.perf_counter(); got = s.run(None, {s.get_inputs()[0].name: x})[0]; dt = time.perf_counter() - t
err = float(np.abs(got - want).max())
print(f"{provider}: batch of {x.shape[0]} in {dt*1e3:.1f} ms, max |score − CPU score| = {err:.2e}")
assert err < 1e-2, err
PYEOF
cat "$WORK/ort_check.txt"

{
  echo "# GPU check (bench/gpu_check.sh$([[ $DRY == 1 ]] && echo ' --dry-run'))"
  echo
  echo "Host: $( [[ -f $WORK/gpu.txt ]] && cat "$WORK/gpu.txt" || echo "no GPU (dry run on CPU)" ); $(date -u +%FT%TZ)"
  echo
  echo "| step | seconds |"
  echo "|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "- merge: $(cat "$WORK/merge_check.txt")"
  echo "- onnx: $(cat "$WORK/ort_check.txt")"
} > "$TABLE"
cat "$TABLE"
[[ -z "${KEEP:-}" ]] && rm -rf "$WORK"
exit 0
