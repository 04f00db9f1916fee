"""PTQ speed: each method as the project runs it against a straightforward run of the same algorithm.

    python benchmarks/ptq_speed.py [--device cuda] [--width 1.0] [--models 4] [--iters 20000] [--plans w4,w2]

On a CIFAR-size ResNet18 (32x32x3 inputs, CIFAR stem; random weights with BatchNorm
statistics from the calibration images), for every method and plan it times:
- ours: the project's implementation (AdaRound/BRECQ: the ``--models`` targets batched
  into one optimisation; OBC: 32 rows per sweep, arrays shrunk to the free columns as they
  go; GPTQ: lazy 128-column blocks);
- straightforward: the same algorithm run plainly (AdaRound/BRECQ: one model at a time;
  OBC: one row at a time on full-size arrays; GPTQ: every column's update applied at once to
  all later columns),
and prints seconds per model, the ratio, and the output reconstruction error of both
(mean squared error of the logits against the full-precision model on the calibration set).
Defaults are the study's iteration counts on a GPU and a reduced setting on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from mia_ptq_bench.environment import describe_device
from mia_ptq_bench.models import build_model
from mia_ptq_bench.quantize import QUANTIZERS, Calibration
from mia_ptq_bench.quantize.obs import obc_quantize
from mia_ptq_bench.quantize.second_order import OBC


class PlainOBC(OBC):
    """The same sweep one row at a time, on full-size arrays throughout."""

    def sweep(self, weight, hessian, grid):
        return obc_quantize(weight, hessian, grid, parallel=1, rel_damp=self.config.rel_damp,
                            fallback_damp=self.config.fallback_damp, compact=1.0)
from mia_ptq_bench.spec import PrecisionPlan
from mia_ptq_bench.spec.schema import ModelSpec


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_models(count: int, width: float, device: str, images: torch.Tensor) -> list[torch.nn.Module]:
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = build_model(ModelSpec(arch="resnet18", width=width), (3, 32, 32), 10).to(device)
        with torch.no_grad():
            model.train()
            model(images[:256])
        models.append(model.eval())
    return models


def calibration(count: int, device: str, seed: int) -> Calibration:
    generator = torch.Generator().manual_seed(seed)
    # Smooth random images (upsampled noise): correlated pixels, like natural images.
    low = torch.randint(0, 256, (count, 3, 8, 8), generator=generator).float()
    raw = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    raw = raw.round().clamp(0, 255).to(torch.uint8).to(device)
    return Calibration(raw, lambda x: (x.float() / 255.0 - 0.5) / 0.25, crop_padding=4, hflip=True, seed=seed)


def reconstruction_error(original: torch.nn.Module, quantized: torch.nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float((quantized(images) - original(images)).square().mean())


def run(method: str, config: dict, models, calibrations, plan, device: str, batched: bool,
        plain: bool = False) -> tuple[float, list]:
    quantizer = PlainOBC(config) if plain and method == "obc" else QUANTIZERS.get(method)(config)
    copies = [copy.deepcopy(m) for m in models]
    synchronize(device)
    start = time.perf_counter()
    if batched:
        out = quantizer.quantize_many(copies, calibrations, plan)
    else:
        out = [quantizer.quantize(m, c, plan) for m, c in zip(copies, calibrations)]
    synchronize(device)
    return (time.perf_counter() - start) / len(models), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=float, default=None, help="ResNet18 width (default 1.0 on GPU, 0.25 on CPU)")
    parser.add_argument("--models", type=int, default=4, help="targets quantized together by the batched methods")
    parser.add_argument("--iters", type=int, default=None, help="AdaRound/BRECQ steps (default 20000 on GPU, 100 on CPU)")
    parser.add_argument("--calibration", type=int, default=None, help="images (default 1024 on GPU, 128 on CPU)")
    parser.add_argument("--plans", default="w4,w2,w1.58,w1.58-last8")
    parser.add_argument("--methods", default="adaround,brecq,obc,gptq")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    width = args.width if args.width is not None else (1.0 if gpu else 0.25)
    iters = args.iters if args.iters is not None else (20000 if gpu else 100)
    count = args.calibration if args.calibration is not None else (1024 if gpu else 128)

    calibrations = [calibration(count, args.device, seed) for seed in range(args.models)]
    models = make_models(args.models, width, args.device, calibrations[0].images)
    print(f"device: {describe_device(args.device)} · torch {torch.__version__} · ResNet18 width {width} on 32x32x3 · "
          f"{args.models} models · {count} calibration images · AdaRound/BRECQ {iters} steps")
    print(f"{'method':9} {'plan':12} {'ours s/model':>13} {'plain s/model':>14} {'ratio':>6} {'err ours':>10} {'err plain':>10}")
    configs = {
        "adaround": ({"iters": iters}, {"iters": iters}),
        "brecq": ({"iters": iters}, {"iters": iters}),
        "obc": ({"calibration": count, "rounds": 10}, {"calibration": count, "rounds": 10}),
        "gptq": ({"block_size": 128}, {"block_size": 1}),
    }
    for method in args.methods.split(","):
        ours_cfg, plain_cfg = configs[method]
        batched = method in ("adaround", "brecq")
        for text in args.plans.split(","):
            plan = PrecisionPlan.parse(text)
            ours_s, ours = run(method, ours_cfg, models, calibrations, plan, args.device, batched=batched)
            plain_s, plain = run(method, plain_cfg, models, calibrations, plan, args.device, batched=False, plain=True)
            images = calibrations[0].images
            folded = [QUANTIZERS.get("rtn")().quantize(copy.deepcopy(m), c, PrecisionPlan.parse("w16"))
                      for m, c in zip(models, calibrations)]
            err_ours = sum(reconstruction_error(f, q, images) for f, q in zip(folded, ours)) / len(models)
            err_plain = sum(reconstruction_error(f, q, images) for f, q in zip(folded, plain)) / len(models)
            print(f"{method:9} {text:12} {ours_s:13.2f} {plain_s:14.2f} {plain_s / ours_s:6.2f} "
                  f"{err_ours:10.3e} {err_plain:10.3e}", flush=True)


if __name__ == "__main__":
    main()
