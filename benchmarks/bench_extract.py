"""Feature extraction speed: extract_features against the model's own forward pass (model.image_features).

    python benchmarks/bench_extract.py                       # 200 COCO-sized JPEGs, resnet18 at 224
    python benchmarks/bench_extract.py --images 100 --backbone resnet50 --workers 0 1 2 --threads 1
    python benchmarks/bench_extract.py --attention-glimpses 2 --output-stride 16    # spatial maps

Both runs see the same images in the same batches, on the same device (a GPU where there
is one: bf16 autocast and channels-last, as extract_features runs it). The forward-only run
gets tensors decoded and on the device beforehand, so the ratio (extraction time / forward
time) is what decoding, preprocessing, the DataLoader, transfers and the cache writes add.
Goal: <= 1.2.
Random weights: the speed of a backbone does not depend on its weights.
"""

import argparse
import copy
import os
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from vqa.config import VQAConfig
from vqa.extraction import extract_features
from vqa.feature_cache import cache_meta
from vqa.images import open_image
from vqa.model import VQAModel


def make_jpegs(folder: Path, count: int, seed: int = 0) -> dict[int, Path]:
    """COCO-like files: 640x480, shapes over a noisy gradient, JPEG quality 90 (~100 KB)."""
    rng = np.random.default_rng(seed)
    paths = {}
    for n in range(count):
        y, x = np.mgrid[0:480, 0:640]
        base = np.stack([x * 255 / 640, y * 255 / 480, np.full_like(x, rng.integers(0, 255))], -1)
        noise = rng.normal(0, 20, (480, 640, 3))
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(8):
            x0, y0 = rng.integers(0, 600), rng.integers(0, 440)
            draw.ellipse((x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)),
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image = image.filter(ImageFilter.GaussianBlur(1))
        path = folder / f"COCO_val2014_{n:012d}.jpg"
        image.save(path, quality=90)
        paths[n] = path
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of run()."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def on_device(model, device: torch.device):
    """The model as extract_features runs it on `device`."""
    if device.type != "cuda":
        return model
    return copy.deepcopy(model).to(device).to(memory_format=torch.channels_last)


def forward_only(model, batches: list[torch.Tensor]) -> None:
    on_cuda = batches[0].is_cuda
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()
    with torch.inference_mode(), autocast:
        for pixels in batches:
            model.image_features(pixels)
    if on_cuda:
        torch.cuda.synchronize()


def decoded_batches(transform, paths: dict[int, Path], batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The images decoded and preprocessed beforehand, on the device, in extract_features' batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as extract_features decodes (see vqa.extraction._one_thread_each)
    started = time.perf_counter()
    decoded = [transform(open_image(paths[i])) for i in sorted(paths)]
    print(f"decode + preprocess alone: {(time.perf_counter() - started) / len(paths) * 1000:.1f} ms/image, one process")
    torch.set_num_threads(threads)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return [torch.stack(decoded[s : s + batch_size]).to(device, memory_format=memory_format)
            for s in range(0, len(decoded), batch_size)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="JPEGs to make and extract")
    parser.add_argument("--backbone", default="resnet18", help="timm model name")
    parser.add_argument("--image-size", type=int, default=224, help="model input side in pixels")
    parser.add_argument("--attention-glimpses", type=int, default=0, help="> 0: extract spatial maps, not pooled")
    parser.add_argument("--output-stride", type=int, default=None, help="timm output_stride (8, 16): finer maps")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader workers to try")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each kind; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the CNN runs (default: the GPU if there is one)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = VQAModel(VQAConfig(backbone=args.backbone, image_size=args.image_size, freeze_backbone=True,
                               attention_glimpses=args.attention_glimpses, output_stride=args.output_stride)).eval()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        paths = make_jpegs(tmp / "images", args.images)
        ids = sorted(paths)
        size_kb = np.mean([p.stat().st_size for p in paths.values()]) / 1024
        kind = f"maps, output stride {args.output_stride or 32}" if args.attention_glimpses else "pooled"
        print(f"{args.images} JPEGs 640x480 (mean {size_kb:.0f} KB), {args.backbone} at {args.image_size} ({kind}), "
              f"batch {args.batch_size}, on {args.device}, {torch.get_num_threads()} torch threads")

        batches = decoded_batches(model.image_transform(), paths, args.batch_size, device)
        runner = on_device(model, device)
        forward_only(runner, batches[:1])  # warm-up: oneDNN (cuDNN) builds its kernels on the first call

        forward_s, forward_cpu = min(timed(lambda: forward_only(runner, batches)) for _ in range(args.repeats))
        print(f"image_features only:       {len(ids) / forward_s:7.1f} images/s, {forward_cpu / len(ids) * 1000:.0f} "
              "CPU ms/image")
        cache_meta(model)  # hashes the weights, once per model: not a per-image cost
        results = {}
        for workers in args.workers:
            runs = []
            for repeat in range(args.repeats):
                folder = tmp / f"cache-{workers}-{repeat}"
                runs.append(timed(lambda: extract_features(model, paths, folder, batch_size=args.batch_size,
                                                           progress=False, num_workers=workers, device=device)))
            wall, cpu = results[workers] = min(runs)
            print(f"extract_features, {workers} workers: {len(ids) / wall:7.1f} images/s, {wall / forward_s:.2f}x "
                  f"the forward pass; {cpu / len(ids) * 1000:.0f} CPU ms/image, {cpu / forward_cpu:.2f}x")
        forward_again = min(timed(lambda: forward_only(runner, batches)) for _ in range(args.repeats))[0]
        if abs(forward_again - forward_s) > 0.1 * forward_s:
            print(f"note: the forward pass took {forward_again / forward_s:.2f}x as long when measured again: "
                  "other work shares this CPU, wall-clock ratios are uncertain by that much")
        best = min(results, key=lambda w: results[w][0])
        print(f"best: {best} workers, {results[best][0] / forward_s:.2f}x the forward pass's time (goal <= 1.2x); "
              f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
