"""Quantized weights as evidence: per output channel, a codebook of the values it holds and a code per weight.

A quantized layer's weight is stored as ``codebook`` (C, L) float32, the distinct values of each
channel in increasing order (padded by repeating the last), ``sizes`` (C,) how many of them are
real, and ``codes`` (C, K), each weight's index into its channel's codebook, bit-packed with as
few bits as the largest codebook needs. Every other tensor of the model's state (biases,
BatchNorm) is stored as it is. From this a checker rebuilds the exact quantized model and audits
it by construction: a channel holds ``sizes[c]`` values, never more. Nothing here trusts a
quantizer's claims: the codebook is read off the weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from ..models import quantizable_layers

SEPARATOR = "::"  # model index :: tensor name :: part


def _bits(values: int) -> int:
    return max(1, math.ceil(math.log2(max(values, 2))))


def encode_weight(weight: torch.Tensor) -> dict[str, np.ndarray]:
    rows = weight.detach().cpu().float().flatten(1).numpy()
    codebooks, codes, sizes = [], [], []
    for row in rows:
        values, index = np.unique(row, return_inverse=True)
        codebooks.append(values)
        codes.append(index)
        sizes.append(len(values))
    width = max(sizes)
    codebook = np.stack([np.pad(v, (0, width - len(v)), mode="edge") for v in codebooks]).astype(np.float32)
    bits = _bits(width)
    code_bits = ((np.stack(codes)[..., None] >> np.arange(bits)) & 1).astype(np.uint8)  # (C, K, bits), LSB first
    return {"codebook": codebook, "sizes": np.array(sizes, dtype=np.int64),
            "codes": np.packbits(code_bits, axis=None), "shape": np.array(weight.shape, dtype=np.int64),
            "bits": np.array([bits], dtype=np.int64)}


_PARTS = {"codebook": "f", "sizes": "iu", "codes": "u", "shape": "iu", "bits": "iu"}


def decode_weight(parts: dict[str, np.ndarray], expected: tuple[int, ...] | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """(weight, per-channel number of distinct values); raises ValueError on an inconsistent record.

    The record comes with a submission: its parts' kinds, and its shape against ``expected`` (the
    architecture's), are checked before anything is allocated in proportion to what it claims."""
    for part, kinds in _PARTS.items():
        if part not in parts or parts[part].dtype.kind not in kinds:
            raise ValueError(f"the weight record's {part} is missing or not of {kinds!r} values")
    if parts["shape"].ndim != 1 or parts["bits"].shape != (1,) or parts["codes"].dtype != np.uint8:
        raise ValueError("the weight record's shape, bits or codes are not laid out as written")
    shape, bits = tuple(int(s) for s in parts["shape"]), int(parts["bits"][0])
    if expected is not None and shape != tuple(expected):
        raise ValueError(f"the weight record claims shape {shape[:8]}, the architecture has {tuple(expected)}")
    if len(shape) < 1 or min(shape) < 1 or not 1 <= bits <= 32:
        raise ValueError("the weight record's shape or bits are out of range")
    codebook, sizes = parts["codebook"], parts["sizes"]
    channels, per_row = shape[0], int(np.prod(shape[1:]))
    if codebook.ndim != 2 or codebook.shape[0] != channels or sizes.shape != (channels,):
        raise ValueError("codebook and sizes do not match the weight's shape")
    if sizes.min() < 1 or sizes.max() > codebook.shape[1] or bits != _bits(codebook.shape[1]):
        raise ValueError("codebook sizes out of range")
    if parts["codes"].size * 8 < channels * per_row * bits:
        raise ValueError("fewer codes than the weight's shape needs")
    flat = np.unpackbits(parts["codes"], count=channels * per_row * bits).reshape(channels, per_row, bits)
    codes = (flat.astype(np.int64) << np.arange(bits)).sum(axis=2)
    if (codes >= sizes[:, None]).any():
        raise ValueError("a code points past its channel's codebook")
    weight = np.take_along_axis(codebook, codes, axis=1).reshape(shape)
    distinct = np.array([len(np.unique(codebook[c, : sizes[c]])) for c in range(channels)])
    return torch.from_numpy(weight.copy()), distinct


def encode_model(index: int, model: nn.Module) -> dict[str, np.ndarray]:
    """Every tensor of a quantized model's state, its Conv2d/Linear weights as codebooks and codes."""
    layers = {f"{name}.weight" for name, _ in quantizable_layers(model)}
    tensors = {}
    for name, value in model.state_dict().items():
        if name in layers:
            for part, array in encode_weight(value).items():
                tensors[SEPARATOR.join((str(index), name, part))] = array
        else:
            tensors[SEPARATOR.join((str(index), name, "raw"))] = value.detach().cpu().numpy()
    return tensors


def model_indices(tensors: dict[str, np.ndarray]) -> list[int]:
    return sorted({int(key.split(SEPARATOR)[0]) for key in tensors})


def decode_model(template: nn.Module, index: int, tensors: dict[str, np.ndarray]) -> tuple[nn.Module, dict[str, int]]:
    """Load model ``index`` of the evidence into ``template`` (same architecture, BN policy applied);
    returns it and, per quantized layer, the most distinct values any channel holds."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        model, name, part = key.split(SEPARATOR)
        if int(model) == index:
            grouped.setdefault(name, {})[part] = value
    shapes = {name: tuple(tensor.shape) for name, tensor in template.state_dict().items()}
    if set(grouped) != set(shapes):
        raise ValueError(f"model {index}: the evidence holds tensors {sorted(set(grouped) ^ set(shapes))[:3]} "
                         "that the architecture does not (or lacks some it needs)")
    state, distinct = {}, {}
    for name, parts in grouped.items():
        if "raw" in parts:
            state[name] = torch.from_numpy(np.array(parts["raw"]))
        else:
            state[name], per_channel = decode_weight(parts, shapes[name])
            distinct[name.removesuffix(".weight")] = int(per_channel.max())
    template.load_state_dict(state)
    return template.eval(), distinct
