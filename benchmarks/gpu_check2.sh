#!/usr/bin/env bash
# Second GPU check: DDP/NCCL training with the run's own ONNX export (--export_onnx), 224 px, AMP bf16.
set -uo pipefail
OUT=${OUT:-./gpu-check}; mkdir -p "$OUT"; DATA=$(mktemp -d)
python3 training/synthetic_birds.py --out "$DATA" --per_class 300 --corrupt 2 > /dev/null
timeout 200 python3 -m torch.distributed.run --standalone --nproc_per_node=1 training/train.py --distributed ddp \
  --data_dir "$DATA" --output_dir "$OUT/run" --weights none --image_size 224 --batch_size 64 --num_epochs 3 --learning_rate 0.01 \
  --export_onnx > "$OUT/run.log" 2>&1; echo "exit $?" >> "$OUT/run.log"
tail -n 8 "$OUT/run.log"
python3 -c "import json; m=json.load(open('$OUT/run/metrics.json')); print({k: m[k] for k in ('backend','device','amp','best_val_acc','images_per_s','data_wait_fraction','onnx')})"
ls -la "$OUT/run"; rm -f "$OUT/run/model.pt" "$OUT/run/model.onnx"; rm -rf "$DATA"
