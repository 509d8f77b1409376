"""End-to-end compression of every 3x3 convolution of a ResNet-50-shaped network.

The architecture is defined here (torchvision is not available beside our torch); weights
are random (He init) and the calibration images synthetic (smooth random fields), so the
numbers measure *speed and memory* of collection + decomposition at ImageNet scale, not
accuracy. Run on a GPU with ``--device cuda``; on this project's 2-core CPU use
``--images 4 --size 64``.

python benchmarks/resnet50_e2e.py --device cuda --out resnet50.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

from tensorly_dataaware._atomic import atomic_write_text
from tensorly_dataaware.torch import collect_covariances, compress, format_report


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = 4 * width
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(2048, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def smooth_images(n, size, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, 3, size // 8, size // 8, generator=gen)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).to(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--methods", nargs="+", default=["tucker2", "cp"])
    p.add_argument("--n-iter-max", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = ResNet50().to(args.device).eval()
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    images = smooth_images(args.images, args.size, args.device)
    batches = list(images.split(args.batch))
    info = {"device": args.device, "machine": platform.platform(), "torch": torch.__version__, "layers": len(layers),
            "images": args.images, "size": args.size, "ratio": args.ratio}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        torch.cuda.synchronize()
    with torch.no_grad():
        start = time.perf_counter()
        for b in batches:
            model(b)
        if args.device == "cuda":
            torch.cuda.synchronize()
        info["forward_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    stats = collect_covariances(model, batches, layers=layers, progress=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    info["collect_seconds"] = time.perf_counter() - start
    info["collect_over_forward"] = info["collect_seconds"] / info["forward_seconds"]
    print(json.dumps(info), flush=True)
    results = []
    for method in args.methods:
        for norm in ("frobenius", "sigma"):
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            _, report = compress(model, stats, method, ratio=args.ratio, norm=norm, layers=layers, progress=False,
                                 return_report=True, n_iter_max=args.n_iter_max, tol=1e-6)
            secs = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
            print(f"\n== {method} {norm}: {secs:.1f} s, peak GPU memory {peak} GiB", flush=True)
            print(format_report(report), flush=True)
            results.append({"method": method, "norm": norm, "seconds": secs, "peak_gib": peak,
                            "layers": [r.as_dict() for r in report]})
    if args.out:
        atomic_write_text(args.out, json.dumps({"info": info, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
