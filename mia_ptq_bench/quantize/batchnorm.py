"""BatchNorm handling around quantization, made explicit: fold, keep, or re-estimate.

- ``fold``: every BatchNorm that directly follows a convolution is folded into it
  (weights scaled, bias shifted) and replaced by Identity, so the quantized weights
  are the ones a deployed integer kernel would use (BRECQ's handling).
- ``keep``: BatchNorm stays in full precision after the quantized convolution (AdaRound's).
- ``reestimate``: BatchNorm stays, and its running statistics are recomputed on the
  calibration images after quantization (OBC's).
A BatchNorm that follows no convolution (DenseNet's pre-activation layers) is kept
under every policy.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import BenchError
from .units import traced_graph

BNPolicy = Literal["fold", "keep", "reestimate"]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, bn name) where the BatchNorm's only input is the conv's output and nothing else reads it.

    Read off the traced graph. A model without BatchNorm has none, traced or not; one with BatchNorm
    that does not trace (dynamic control flow) is a clear error, not a guess.
    """
    if not has_batchnorm(model):
        return []
    modules = dict(model.named_modules())
    graph = traced_graph(model, "folding BatchNorm (bn: fold; keep or reestimate do without)")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d) and len(source.users) == 1):
            pairs.append((str(source.target), str(node.target)))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]] | None = None) -> nn.Module:
    """Fold conv->BN pairs in place (eval-mode statistics); the model computes the same function in eval mode.

    ``pairs``: the model's ``conv_bn_pairs``, when already traced on a model of the same architecture.
    """
    for conv_name, bn_name in conv_bn_pairs(model) if pairs is None else pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.running_var is None:
            raise BenchError(f"BatchNorm {bn_name!r} keeps no running statistics (track_running_stats=False): it "
                             "normalises every batch by that batch's own statistics, which no convolution can hold; "
                             "set bn: keep")
        # affine=False: a scale of 1 and no shift
        scale = (bn.weight if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * scale + (bn.bias if bn.bias is not None else 0)
        conv.bias = nn.Parameter(new_bias.detach().clone())
        _set_submodule(model, bn_name, nn.Identity())
    return model


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance on ``images`` (a cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    batches = list(images.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        # A batch of one image gives a BatchNorm over a 1x1 map one value per channel, which it refuses:
        # the last image joins the batch before it (no other split changes, so neither do their statistics).
        batches[-2:] = [images[-(batch_size + 1):]]
    model.train()
    try:
        for batch in batches:
            model(batch)
    except ValueError as exc:  # one calibration image in all, and a BatchNorm over a 1x1 map
        reason = " ".join(str(exc).split())[:200]
        raise BenchError(f"re-estimating BatchNorm statistics on {len(images)} calibration image(s): {reason}; "
                         "calibrate on more images") from None
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
    return model.eval()
