#!/usr/bin/env bash
# GPU data-path check (needs a CUDA GPU; not run on the CPU-only development machine): 224 px,
# 3,000 images, batch 128, bf16, one process, 3 epochs. First the pure compute (fwd+bwd+SGD on an
# in-memory batch), then train.py for real with the decoded cache off (decode every epoch) and on
# (the default). For each epoch it prints img/s, the data-wait fraction and real/compute.
# Targets (issue 17): from the second epoch on, real >= 85% of compute; the first epoch >= 1.5x
# the old path's. Usage: bash benchmarks/gpu_loader.sh [workers]   (OUT=./gpu-check by default)
set -uo pipefail
WORKERS=${1:-8}
OUT=${OUT:-./gpu-check}; mkdir -p "$OUT"; DATA=$(mktemp -d)
python3 training/synthetic_birds.py --out "$DATA" --per_class 1500 > /dev/null
COMPUTE=$(python3 - <<'PY'
import torch, time, torchvision
m = torchvision.models.resnet18(num_classes=2).cuda().to(memory_format=torch.channels_last)
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x = torch.randn(128, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last); y = torch.randint(0, 2, (128,), device="cuda")
for i in range(30):
    if i == 10: torch.cuda.synchronize(); t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(m(x).float(), y)
    opt.zero_grad(); loss.backward(); opt.step()
torch.cuda.synchronize(); print(f"{20 * 128 / (time.perf_counter() - t):.0f}")
PY
)
echo "$(date -u +%F) $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1): pure compute (bf16, channels_last, batch 128): $COMPUTE img/s"
for cache in 0 2048; do
  timeout 600 python3 training/train.py --data_dir "$DATA" --output_dir "$OUT/cache$cache" --weights none --image_size 224 \
    --batch_size 128 --num_epochs 3 --workers "$WORKERS" --amp bf16 --decode_cache_mb $cache > "$OUT/cache$cache.log" 2>&1
  echo "decode_cache_mb=$cache (workers $WORKERS) exit $?"
  python3 - "$OUT/cache$cache/metrics.json" "$COMPUTE" <<'PY'
import json, sys
m = json.load(open(sys.argv[1])); compute = float(sys.argv[2])
for r in m["history"]:
    print(f"  epoch {r['epoch']}: {r['images_per_s']:.0f} img/s, data wait {100 * r['data_wait_fraction']:.0f}%, real/compute {r['images_per_s'] / compute:.2f}")
PY
  rm -f "$OUT/cache$cache/model.pt"
done
rm -rf "$DATA"
