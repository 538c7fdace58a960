#!/usr/bin/env bash
# One short, prepared check of the training snapshot on a CUDA machine (the lent GPU box):
# DDP over NCCL (torchrun, one GPU -> world size 1, forced DDP), bf16 autocast, channels_last,
# SyncBatchNorm, data-loader wait, throughput at 224 px, then ONNX export + parity.
# Results go to $OUT (or ./gpu-check). Uses whatever python3 holds torch there.
set -uo pipefail
OUT=${OUT:-./gpu-check}
mkdir -p "$OUT"
PY=${PY:-python3}
DATA=$(mktemp -d)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'nccl', torch.cuda.nccl.version())"
} 2>&1 | tee "$OUT/env.txt"
$PY training/synthetic_birds.py --out "$DATA" --per_class 400 --corrupt 2 | tee -a "$OUT/env.txt"
run() {  # name, then train.py args
  local name=$1; shift
  echo "== $name"
  timeout 150 $PY -m torch.distributed.run --standalone --nproc_per_node=1 training/train.py --distributed ddp \
    --data_dir "$DATA" --output_dir "$OUT/$name" --weights none --image_size 224 --batch_size 64 "$@" > "$OUT/$name.log" 2>&1
  echo "exit $?" | tee -a "$OUT/$name.log"
  tail -n 6 "$OUT/$name.log"
}
run nccl_bf16 --num_epochs 4 --learning_rate 0.01
run nccl_fp32 --num_epochs 2 --amp none
run nccl_syncbn_fp16 --num_epochs 2 --bn sync --amp fp16
echo "== onnx"
timeout 120 $PY training/export_onnx.py --model "$OUT/nccl_bf16/model.pt" --data_dir "$DATA" --samples 64 2>&1 | tee "$OUT/onnx.log"
$PY - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for d in sorted(p for p in out.iterdir() if (p / "metrics.json").exists()):
    m = json.loads((d / "metrics.json").read_text())
    last = m["history"][-1]
    print(f"{d.name}: backend={m['backend']} device={m['device']} amp={m['amp']} best_val_acc={m['best_val_acc']:.3f} "
          f"img/s(last epoch)={last['images_per_s']} data_wait={100*last['data_wait_fraction']:.1f}% peak_mem={m['peak_memory_mb']} MB")
PY
rm -rf "$DATA"
