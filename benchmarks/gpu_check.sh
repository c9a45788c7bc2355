#!/usr/bin/env bash
# Everything the GPU issue measures, in one go on a machine with an NVIDIA GPU: parity of every kernel against
# float64, the side-by-side tables (logits path, launch sweep, fused LM head), a profile of the logits path,
# and the distill pass end to end (CPU vs CUDA vs torchrun/nccl). Each step writes its output to OUT as it
# finishes, so a run cut short still returns what it measured.
#
#   make gpu-wheels                      # here: the wheels and tokenizer the GPU image lacks, into .whl/
#   bash benchmarks/gpu_check.sh OUT     # there, from the repository root, with .whl carried along
#
# STEPS (default: all) picks steps by name: env parity logits fused profile distill tune; LOGITS_EXTRA=0
# skips the second logits table, FUSED_VARIANTS sets the fused variants. TUNE_LOSSES,
# TUNE_VOCAB and TUNE_WARPS narrow the launch sweep.
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu-check}}
steps=${STEPS:-env parity logits fused profile distill tune}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TRITON_DEFAULT_FP_FUSION=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
bench="python3 benchmarks/kd_loss.py"
has() { [[ " $steps " == *" $1 "* ]]; }
step() {  # step NAME LIMIT_S CMD...: run, time, keep the output
  local name=$1 limit=$2; shift 2
  has "$name" || return 0
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$out/summary.txt"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  tail -n 60 "$out/$name.txt"
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
}
step env 60 bash -c 'nvidia-smi -L; python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)"; python3 -c "import torch; a = torch.randn(64, 64, device=\"cuda\", dtype=torch.bfloat16); o = torch.zeros(64, 64, device=\"cuda\"); torch.addmm(o, a, a, out_dtype=torch.float32, out=o); print(\"addmm out_dtype:\", (o - a.float() @ a.float()).abs().max().item())"'
step parity 300 env COMPRESS_KERNEL_CHILD=1 COMPRESS_KERNEL_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider \
  -W ignore::RuntimeWarning tests/test_kernels.py
step logits 150 bash -c "$bench --loss all --vocab 128000 --tokens 4096 && { [ \"${LOGITS_EXTRA:-1}\" = 0 ] || $bench --loss forward_kl --vocab 32000 256000 --tokens 4096 16384; }"
step fused 150 $bench --fused-linear --loss forward_kl jsd --vocab 128000 --tokens 4096 --hidden 4096 \
  --variants ${FUSED_VARIANTS:-rows:128 rows:256 rows:512 rows:1024 vocab:2048 vocab:4096} --iters 6
step profile 60 $bench --profile --loss forward_kl --vocab 128000 --tokens 4096
step distill 300 python3 benchmarks/gpu_distill.py --out /tmp/gpu-distill --tokenizer .whl/tokenizer
step tune 200 $bench --tune --loss ${TUNE_LOSSES:-forward_kl reverse_kl jsd} --vocab ${TUNE_VOCAB:-32000 128000 256000} \
  --tokens 4096 --blocks 2048 4096 8192 16384 --warps ${TUNE_WARPS:-8 16 32} --iters 6
cat "$out/summary.txt"
