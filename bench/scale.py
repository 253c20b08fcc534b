"""The largest run: a torchvision ResNet-18 (11.2M parameters, ResNet's ImageNet stem on 3x32x32 inputs)
exported with torch's default ONNX export (external data), loaded as the worker loads uploads, and
audited with `ekfac` over N synthetic examples, with progress printed as the engine reports it.
Reports seconds per 1,000 examples, peak RSS, and the audit's cost in training epochs' worth (one
epoch of SGD on a sample of the same data, timed in the same run and scaled to N).

    .venv/bin/python bench/scale.py [--n 50000] [--method ekfac] [--epoch-sample 2000]
Writes bench/results/scale.md.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from common import environment, write_result
from app.artifacts.loaders import load_onnx
from app.influence import AuditConfig, run_audit
from tests.helpers import export_onnx


def synthetic_images(n: int, classes: int = 10, seed: int = 0):
    """Class-dependent mean images plus noise, in chunks (50k x 3x32x32 float32 is 614 MB)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, 3, 32, 32, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = torch.empty(n, 3, 32, 32)
    for start in range(0, n, 5000):
        stop = min(n, start + 5000)
        images[start:stop] = means[labels[start:stop]] + torch.randn(stop - start, 3, 32, 32, generator=g)
    return images, labels


def seconds_per_training_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> float:
    """One SGD epoch over x (a sample), in seconds; the model is copied so the audited one is untouched."""
    import copy

    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    started = time.perf_counter()
    for index in torch.randperm(len(x)).split(batch_size):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--method", default="ekfac")
    parser.add_argument("--epoch-sample", type=int, default=2000, help="examples the training epoch is timed on")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images, labels = synthetic_images(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, images[:2], Path(tmp) / "resnet18.onnx", external_data=True)
        data = Path(tmp) / "resnet18.onnx.data"
        loaded = load_onnx(path, {data.name: data})
        exported_mb = (path.stat().st_size + data.stat().st_size) / 1e6
    print(f"loaded: {loaded.num_parameters:,} parameters, {exported_mb:.1f} MB exported", flush=True)

    sample = min(args.epoch_sample, args.n)
    epoch_seconds = seconds_per_training_epoch(model, images[:sample], labels[:sample]) * args.n / sample
    print(f"one training epoch over {args.n}: {epoch_seconds:.1f} s (timed on {sample})", flush=True)

    started = time.perf_counter()
    last = [0.0]

    def progress(stage: str, fraction: float) -> None:
        now = time.perf_counter() - started
        if now - last[0] >= 30 or fraction in (0.0, 1.0):
            last[0] = now
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"  {now:7.1f} s  {stage:<12} {fraction:6.1%}  peak RSS {peak:,.0f} MB", flush=True)

    result = run_audit(loaded.module, images, labels, AuditConfig(method=args.method), progress=progress)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finite = bool(torch.isfinite(result.scores).all())
    text = (f"# Scale: torchvision ResNet-18 on {args.n:,} synthetic 3x32x32 examples, `{args.method}`\n\n"
            f"Environment: {environment()}, {sys.platform}\n\n"
            f"- model: {loaded.num_parameters:,} parameters, exported with torch's defaults ({exported_mb:.1f} MB, "
            f"external data), loaded as an upload is\n"
            f"- audit: {seconds:.0f} s = {1000 * seconds / args.n:.2f} s per 1,000 examples; all scores finite: {finite}\n"
            f"- one SGD training epoch over the same {args.n:,} examples: {epoch_seconds:.0f} s (timed on {sample}); "
            f"the audit costs {seconds / epoch_seconds:.1f} epochs' worth\n"
            f"- peak RSS of the whole run (data {images.numel() * 4 / 1e6:.0f} MB included): {peak:,.0f} MB\n"
            f"- batch size chosen by the engine: {result.summary.get('batch_size')}; passes: "
            f"{result.summary.get('passes', result.summary.get('plan'))}\n")
    print(text)
    write_result(f"scale-resnet18-{args.method}.md", text)


if __name__ == "__main__":
    main()
