#!/usr/bin/env bash
# The GPU check, ready for the day a CUDA machine is lent. Run it from anywhere in the working tree
# (which travels to the machine; nothing is downloaded there):
#
#   bash benchmarks/gpu_check.sh                          # results in $OUT, else benchmarks/results/cuda-bf16/
#   bash benchmarks/gpu_check.sh --device cpu --smoke --out /tmp/check   # the same steps, toy sizes, on a CPU
#   (add --precision fp32 on a CPU without native bf16, where bf16 matmuls are emulated and very slow)
#
# 1. installs what the machine lacks: navit from this tree (PYTHONPATH), and any wheels carried in
#    .whl/ (e.g. PyAV, vit-pytorch) into /tmp/navit-site;
# 2. writes environment.txt (torch, CUDA, GPU, optional packages) and refuses a machine without CUDA;
# 3. runs the CUDA tests (isolation and agreement of every CUDA backend, torch.compile) -> tests.log;
# 4. runs the bf16 benchmark suite, `run_all.py --suite gpu`: varlen and flex attention up to
#    L = 8192, the peers at ViT-B width with an L sweep to 8192, torch.compile, video clips packed vs
#    padded, SigLIP2 packed vs transformers, segmentation -> SUMMARY.md and one .md/.json per step.
# Every step has a time budget and the whole run one more (--budget, default 480 s): it ends inside
# 8 minutes, and a step that runs out is stopped and reported while the others still run.
# Exit status: 0 when the tests and every step passed, 1 otherwise, 2 for bad options or no CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
device=cuda smoke="" budget=480 precision=bf16 out="${OUT:-benchmarks/results/cuda-bf16}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --smoke) smoke="--smoke"; shift ;;
    --budget) budget="$2"; shift 2 ;;
    --precision) precision="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (expected --device cuda|cpu, --smoke, --budget SECONDS, --precision bf16|fp32, --out DIR)" >&2
       exit 2 ;;
  esac
done
start=$(date +%s)
py="${PYTHON:-python3}"
mkdir -p "$out"

if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/navit-site .whl/*.whl \
    || { echo "gpu_check.sh: installing the wheels carried in .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/navit-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1

"$py" - "$device" > "$out/environment.txt" <<'EOF'
import importlib.util, platform, sys
import torch
device = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for name in ("navit", "timm", "transformers", "vit_pytorch", "av", "safetensors", "yaml", "matplotlib"):
    print(f"{name}: {'yes' if importlib.util.find_spec(name) else 'MISSING'}")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit(f"gpu_check.sh: --device cuda, but torch {torch.__version__} sees no CUDA device")
EOF
[ $? -eq 0 ] || { cat "$out/environment.txt"; echo "gpu_check.sh: no usable CUDA device (use --device cpu --smoke to test the check)" >&2; exit 2; }
cat "$out/environment.txt"

echo "=== CUDA tests (at most 90 s) -> $out/tests.log"
timeout 90 "$py" -m pytest -q -p no:cacheprovider tests/test_attention.py -k "Cuda or compile or varlen or flex" \
  > "$out/tests.log" 2>&1
tests=$?
tail -n 1 "$out/tests.log"

left=$((budget - ($(date +%s) - start)))
threads=$([ "$device" = cuda ] && echo 8 || echo 2)
"$py" benchmarks/run_all.py --suite gpu $smoke --device "$device" --precision "$precision" --threads "$threads" \
  --budget "$left" --out-dir "$out"
suite=$?
echo "gpu_check.sh: tests exit $tests, benchmarks exit $suite, $(($(date +%s) - start)) s; tables in $out/SUMMARY.md"
[ "$tests" -eq 0 ] && [ "$suite" -eq 0 ]
