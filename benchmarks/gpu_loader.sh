#!/usr/bin/env bash
# GPU data-loading check: is the data wait real or start-up? 224 px, 3,000 images, 3 epochs,
# bf16, DDP/NCCL world size 1, with 8 and 14 loader workers. Prints per-epoch throughput.
set -uo pipefail
OUT=${OUT:-./gpu-check}; mkdir -p "$OUT"; DATA=$(mktemp -d)
python3 training/synthetic_birds.py --out "$DATA" --per_class 1500 > /dev/null
for w in 8 14; do
  timeout 240 python3 -m torch.distributed.run --standalone --nproc_per_node=1 training/train.py --distributed ddp \
    --data_dir "$DATA" --output_dir "$OUT/w$w" --weights none --image_size 224 --batch_size 128 --num_epochs 3 --workers $w > "$OUT/w$w.log" 2>&1
  echo "workers=$w exit $?"; grep -E "epoch [0-9]/3" "$OUT/w$w.log" | sed 's/.*\[train\] //'
  rm -f "$OUT/w$w/model.pt"
done
python3 - <<'PY'
import torch, time, torchvision
m = torchvision.models.resnet18(num_classes=2).cuda().to(memory_format=torch.channels_last)
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x = torch.randn(128, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last); y = torch.randint(0, 2, (128,), device="cuda")
for i in range(25):
    if i == 5: torch.cuda.synchronize(); t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(m(x).float(), y)
    opt.zero_grad(); loss.backward(); opt.step()
torch.cuda.synchronize(); print(f"pure compute (bf16, channels_last, batch 128): {20*128/(time.perf_counter()-t):.0f} img/s")
PY
rm -rf "$DATA"
