"""Writes a small synthetic two-class image set standing in for the article's chickens vs turkeys.

No data set can be downloaded on these machines, so the demo and the tests draw their own:
- "chicken": a round, pale-to-golden body with a small red comb and a short beak;
- "turkey": a darker brown body in front of a fanned, striped tail of radiating wedges.
Backgrounds, sizes, positions, rotations and colours vary, and pixel noise is added, so the
classes are separable but not by one pixel statistic. Optionally some files are corrupt
(truncated JPEGs and text named .jpg) to exercise the bad-image handling.

    python synthetic_birds.py --out ./birds --per_class 60 --layout split --corrupt 2
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("chicken", "turkey")


def _background(rng: random.Random, size: int) -> Image.Image:
    top = tuple(rng.randint(90, 220) for _ in range(3))
    bottom = tuple(max(0, c - rng.randint(20, 80)) for c in top)
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        t = y / max(1, size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    return img


def _draw_chicken(draw: ImageDraw.ImageDraw, rng: random.Random, cx: float, cy: float, r: float) -> None:
    body = (rng.randint(225, 255), rng.randint(200, 245), rng.randint(110, 200))
    draw.ellipse([cx - r, cy - r * 0.85, cx + r, cy + r * 0.85], fill=body)
    hr = r * 0.42
    hx, hy = cx + r * 0.7, cy - r * 0.75
    draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=body)
    red = (rng.randint(200, 255), rng.randint(0, 40), rng.randint(0, 40))
    for k in range(3):  # the comb
        x0 = hx - hr * 0.6 + k * hr * 0.45
        draw.ellipse([x0, hy - hr * 1.5, x0 + hr * 0.5, hy - hr * 0.8], fill=red)
    draw.polygon([(hx + hr * 0.9, hy - hr * 0.2), (hx + hr * 1.7, hy), (hx + hr * 0.9, hy + hr * 0.3)], fill=(240, 160, 20))


def _draw_turkey(draw: ImageDraw.ImageDraw, rng: random.Random, cx: float, cy: float, r: float) -> None:
    fan_r = r * 1.6
    wedges = rng.randint(7, 11)
    start = 200 + rng.uniform(-15, 15)
    span = 140
    for k in range(wedges):  # the striped tail fan
        a0 = start + span * k / wedges
        a1 = start + span * (k + 1) / wedges
        shade = (
            (rng.randint(90, 150), rng.randint(50, 80), rng.randint(15, 40))
            if k % 2
            else (rng.randint(40, 70), rng.randint(25, 45), rng.randint(10, 25))
        )
        draw.pieslice([cx - fan_r, cy - fan_r, cx + fan_r, cy + fan_r], a0, a1, fill=shade)
        tip = math.radians((a0 + a1) / 2)
        tx, ty = cx + fan_r * 0.92 * math.cos(tip), cy + fan_r * 0.92 * math.sin(tip)
        draw.ellipse([tx - r * 0.1, ty - r * 0.1, tx + r * 0.1, ty + r * 0.1], fill=(230, 230, 220))
    body = (rng.randint(60, 110), rng.randint(35, 60), rng.randint(20, 40))
    draw.ellipse([cx - r * 0.8, cy - r * 0.7, cx + r * 0.8, cy + r * 0.9], fill=body)
    hr = r * 0.28
    hx, hy = cx + r * 0.45, cy - r * 0.9
    draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=(120, 150, 200))
    draw.line([(hx + hr * 0.3, hy + hr * 0.4), (hx + hr * 0.5, hy + hr * 2.2)], fill=(210, 20, 30), width=max(1, int(hr * 0.5)))


def draw_bird(label: str, rng: random.Random) -> Image.Image:
    size = rng.randint(72, 160)
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.2, 0.3)
    cx = size * rng.uniform(0.35, 0.65)
    cy = size * rng.uniform(0.4, 0.65)
    (_draw_chicken if label == "chicken" else _draw_turkey)(draw, rng, cx, cy, r)
    img = img.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR, fillcolor=img.getpixel((0, 0)))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    noise = Image.effect_noise((size, size), rng.uniform(8, 24)).convert("RGB")
    img = Image.blend(img, noise, rng.uniform(0.05, 0.15))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def write_corrupt(path: Path, rng: random.Random, kind: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind % 2 == 0:  # a JPEG cut off half way
        tmp = path.with_suffix(".tmp.jpg")
        draw_bird("chicken", rng).save(tmp, quality=90)
        data = tmp.read_bytes()
        tmp.unlink()
        path.write_bytes(data[: len(data) // 2])
    else:  # not an image at all
        path.write_text("this is not an image\n")


def generate(
    out: str | Path,
    per_class: int = 40,
    *,
    layout: str = "flat",
    val_fraction: float = 0.25,
    corrupt: int = 0,
    seed: int = 0,
    prefix: str = "",
) -> list[Path]:
    """Write `per_class` images of each class under `out`; returns the paths written.

    layout "flat": out/<class>/<name>.jpg (the blob-store convention, split later by hash);
    layout "split": out/train/<class>/... and out/val/<class>/... (the reference ImageFolder layout).
    `corrupt` extra unreadable files are spread over the classes (train split).
    """
    if layout not in ("flat", "split"):
        raise ValueError("layout must be 'flat' or 'split'")
    root = Path(out)
    rng = random.Random(seed)
    written: list[Path] = []
    n_val = max(1, round(per_class * val_fraction))
    for label in CLASSES:
        for i in range(per_class):
            split = "val" if i < n_val else "train"
            folder = root / split / label if layout == "split" else root / label
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{prefix}{label}-{seed:04d}-{i:05d}.{'png' if i % 10 == 9 else 'jpg'}"
            options: dict[str, Any] = {"quality": 88} if path.suffix == ".jpg" else {}
            draw_bird(label, rng).save(path, **options)
            written.append(path)
    for k in range(corrupt):
        label = CLASSES[k % len(CLASSES)]
        folder = root / "train" / label if layout == "split" else root / label
        path = folder / f"{prefix}corrupt-{seed:04d}-{k:03d}.jpg"
        write_corrupt(path, rng, k)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument("--per_class", type=int, default=40, help="images per class")
    p.add_argument("--layout", choices=("flat", "split"), default="flat", help="flat: <class>/<img>; split: train|val/<class>/<img>")
    p.add_argument("--val_fraction", type=float, default=0.25, help="share of each class put in val/ (layout split)")
    p.add_argument("--corrupt", type=int, default=0, help="extra unreadable files to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (the output is a function of it)")
    args = p.parse_args(argv)
    paths = generate(args.out, args.per_class, layout=args.layout, val_fraction=args.val_fraction, corrupt=args.corrupt, seed=args.seed)
    print(f"wrote {len(paths)} files under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
