"""G same-architecture models as one wide network, so that small models make big convolutions.

Every activation of the wide network holds the G models side by side along the channel axis,
model g owning channel block g: a Conv2d(C, O, groups=k) becomes Conv2d(G*C, G*O, groups=G*k),
a BatchNorm over G*C channels keeps each model's batch and running statistics to its own
channels, a Linear becomes one batched matmul, and channel-wise layers (ReLU, pooling,
residual additions) need no change; a Flatten and the Linear after it become one layer that reads
each model's map in the order the channels_last layout stores it. A forward of the wide network is then G
independent forwards, and the gradient of the summed losses is each model's own gradient.

A layer that mixes channels across blocks (DenseNet's concatenations, for one) would break
this, so ``widen`` checks the wide network against the models it came from and refuses
what it cannot stack.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class NotStackable(ValueError):
    pass


class StackedLinear(nn.Module):
    """G independent Linear layers: (B, G*in) -> (B, G*out), weights (G, out, in)."""

    def __init__(self, models: int, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.models = models
        self.weight = nn.Parameter(torch.empty(models, out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(models, out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x = x.reshape(batch, self.models, -1).transpose(0, 1)
        weight = self.weight.transpose(1, 2)
        y = torch.bmm(x, weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), x, weight)
        return y.transpose(0, 1).reshape(batch, -1)

    def stack(self, leaf: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """This layer's ``leaf`` parameter holding the models' own ``parts``."""
        return torch.stack(parts)

    def unstack(self, leaf: str, value: torch.Tensor, index: int) -> torch.Tensor:
        """Model ``index``'s own ``leaf`` parameter, out of this layer's."""
        return value[index]


class FlattenedStackedLinear(StackedLinear):
    """A Flatten and the StackedLinear after it, reading each model's (C, H, W) map in (H, W, C) order.

    In a channels_last wide network, the models' channels sit side by side at every pixel; a plain
    Flatten copies the map into each model's (C, H, W) order and hands its gradient back in that
    order, so the ReLU and the max-pool before it run their backward on a mixed layout. Reading the
    features in (H, W, C) order keeps the gradient channels_last; the weight is stored with its
    columns in that order (``stack``/``unstack`` convert), so each model computes the same sums,
    in another order. On fashion-mnist-cnn's wide network (G=16, 2 CPU cores) the step went from
    77.9 to 74.1 ms (14 interleaved rounds).
    """

    def __init__(self, linear: StackedLinear, channels: int) -> None:
        models, out_features, in_features = linear.weight.shape
        super().__init__(models, in_features, out_features, linear.bias is not None, linear.weight.dtype)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, self.models, self.channels)
        columns = pixels.permute(2, 0, 1, 3).reshape(self.models, batch, -1).transpose(1, 2)  # (G, in, B)
        # weight @ input^T: the weight's gradient comes out of the backward matmul in its own layout
        y = torch.bmm(self.weight, columns) if self.bias is None else \
            torch.baddbmm(self.bias.unsqueeze(2), self.weight, columns)
        return y.permute(2, 0, 1).reshape(batch, -1)

    def _columns(self, weight: torch.Tensor, pixel_major: bool) -> torch.Tensor:
        *lead, in_features = weight.shape
        pixels = in_features // self.channels
        shape = (*lead, pixels, self.channels) if pixel_major else (*lead, self.channels, pixels)
        return weight.reshape(shape).transpose(-1, -2).reshape(*lead, in_features)

    def stack(self, leaf: str, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self._columns(p, pixel_major=False) if leaf == "weight" else p for p in parts])

    def unstack(self, leaf: str, value: torch.Tensor, index: int) -> torch.Tensor:
        return self._columns(value[index], pixel_major=True) if leaf == "weight" else value[index]


class PooledConv2d(nn.Conv2d):
    """A Conv2d and the max-pool after it, the bias added after the pool, to a quarter of the elements.

    A channel's bias is a constant over its map, and rounding is monotone, so the pooled values
    are the same bits either way; what moves is the bias's gradient, summed over the pooled map
    instead of the full one, and rounding, where the convolution added the bias inside its sums.
    The parameters keep their names (``weight``, ``bias``). On fashion-mnist-cnn's first stage (G=16,
    2 CPU cores) forward and backward went from 19.5 to 17.7 ms.
    """

    def __init__(self, conv: nn.Conv2d, pool: nn.MaxPool2d) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, True, conv.padding_mode, dtype=conv.weight.dtype)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self._conv_forward(x, self.weight, None)) + self.bias.view(1, -1, 1, 1)


def _wide_layer(module: nn.Module, g: int, dtype: torch.dtype) -> nn.Module | None:
    if type(module) is nn.Conv2d:
        return nn.Conv2d(g * module.in_channels, g * module.out_channels, module.kernel_size, module.stride,
                         module.padding, module.dilation, g * module.groups, module.bias is not None,
                         module.padding_mode, dtype=dtype)
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return type(module)(g * module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, dtype=dtype)
    if type(module) is nn.Linear:
        return StackedLinear(g, module.in_features, module.out_features, module.bias is not None, dtype)
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise NotStackable(f"{type(module).__name__} has weights the wide network does not know how to stack")
    return None


def stack_states(models: list[nn.Module], wide: nn.Module) -> dict[str, torch.Tensor]:
    """The wide network's state holding ``models`` side by side."""
    states = [m.state_dict() for m in models]
    stacked = {}
    for name, slot in wide.state_dict().items():
        parts, owner = [s[name] for s in states], _owner(wide, name)
        if isinstance(owner, StackedLinear):
            stacked[name] = owner.stack(name.rpartition(".")[2], parts)
        elif slot.ndim == 0:  # num_batches_tracked: every model has taken the same steps
            stacked[name] = parts[0]
        else:
            stacked[name] = torch.cat(parts)
    return stacked


def unstack_state(wide: nn.Module, models: int, index: int) -> dict[str, torch.Tensor]:
    """Model ``index``'s own state dict, out of the wide network's."""
    state = {}
    for name, value in wide.state_dict().items():
        owner = _owner(wide, name)
        if isinstance(owner, StackedLinear):
            state[name] = owner.unstack(name.rpartition(".")[2], value, index)
        elif value.ndim == 0:
            state[name] = value
        else:
            state[name] = value.chunk(models)[index]
    return {name: value.detach().clone() for name, value in state.items()}


def _owner(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name.rpartition(".")[0])


def _adjacent(network: nn.Module):
    """(Sequential, i, qualified name of its i-th layer) for every pair of neighbours i, i + 1 in
    ``network``'s Sequentials: where the rewrites below look; each may replace the pair in place."""
    for prefix, module in network.named_modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                yield module, i, f"{prefix}.{i}" if prefix else str(i)


def _pool_before_relu(network: nn.Module) -> None:
    """Swap every ReLU -> MaxPool2d pair of a Sequential to MaxPool2d -> ReLU, the ReLU in place, in place.

    The two orders compute the same values and the same gradients, bit for bit (max picks one
    element and ReLU is monotone; where a window holds no positive value both give zero gradient),
    but the ReLU and its backward then touch a quarter of the elements: on fashion-mnist-cnn's
    wide network (G=16, 2 CPU cores) the step went from 181 to 158 ms. The ReLU may then overwrite
    the pooled map, which the max-pool's backward does not read (it keeps its input and indices),
    and masks its gradient by output > 0, the same as input > 0: the same bits again, without a
    fresh map to write (step 74.2 -> 71.7 ms, 8 interleaved rounds).
    """
    for module, i, _ in _adjacent(network):
        if type(module[i]) is nn.ReLU and type(module[i + 1]) is nn.MaxPool2d:
            module[i], module[i + 1] = module[i + 1], nn.ReLU(inplace=True)


def _bias_after_pool(network: nn.Module) -> None:
    """Fold every Conv2d (with a bias) -> MaxPool2d pair of a Sequential into a PooledConv2d, in place."""
    for module, i, _ in _adjacent(network):
        conv, pool = module[i], module[i + 1]
        if type(conv) is nn.Conv2d and conv.bias is not None and type(pool) is nn.MaxPool2d and not pool.return_indices:
            module[i], module[i + 1] = PooledConv2d(conv, pool), nn.Identity()


def _flattened_maps(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """The channel count of every (C, H, W) map, of several channels and pixels, that a whole-sample
    nn.Flatten of ``model`` receives, by name."""
    channels: dict[str, int] = {}

    def record(name: str, inputs: tuple) -> None:
        # Only where the two orders differ: with one channel or one pixel the plain layers stay, and
        # so do the bits of every pool trained before the fold (digits-mlp, ResNet's 1x1 map).
        if inputs[0].ndim == 4 and inputs[0].shape[1] > 1 and inputs[0].shape[2] * inputs[0].shape[3] > 1:
            channels[name] = inputs[0].shape[1]

    probe = copy.deepcopy(model).cpu().eval()
    for name, module in probe.named_modules():
        if type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
            module.register_forward_hook(lambda m, inputs, out, name=name: record(name, inputs))
    dtype = next(probe.parameters()).dtype
    try:
        with torch.no_grad():
            probe(torch.zeros(2, *input_shape, dtype=dtype))
    except RuntimeError as exc:
        raise NotStackable(f"the model does not run on its input shape: {exc}") from None
    return channels


def _flatten_into_linear(network: nn.Module, maps: dict[str, int]) -> None:
    """Fold every Flatten -> StackedLinear pair of a Sequential whose Flatten receives a (C, H, W) map
    into one FlattenedStackedLinear, in place (``maps``: C by the Flatten's name)."""
    for module, i, name in _adjacent(network):
        if type(module[i]) is nn.Flatten and type(module[i + 1]) is StackedLinear and name in maps:
            module[i], module[i + 1] = nn.Identity(), FlattenedStackedLinear(module[i + 1], maps[name])


def widen(models: list[nn.Module], input_shape: tuple[int, ...]) -> nn.Module:
    """One wide network holding ``models`` (same architecture) side by side; NotStackable if it cannot.

    The check runs the wide network and the models on a small random batch (in eval mode, on
    copies on the CPU) and compares: a mix-up between channel blocks changes every output.
    """
    g = len(models)
    maps = _flattened_maps(models[0], input_shape)
    wide = copy.deepcopy(models[0]).cpu()
    dtype = next(wide.parameters()).dtype  # float64 in the tests
    for name, module in list(wide.named_modules()):
        replacement = _wide_layer(module, g, dtype)
        if replacement is not None and not name:
            wide = replacement
        elif replacement is not None:
            parent, _, child = name.rpartition(".")
            setattr(wide.get_submodule(parent), child, replacement)
    _flatten_into_linear(wide, maps)
    _pool_before_relu(wide)
    _bias_after_pool(wide)
    copies = [copy.deepcopy(m).cpu().eval() for m in models]
    wide.load_state_dict(stack_states(copies, wide))
    wide.eval()
    probe = torch.randn(2, g, *input_shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    with torch.no_grad():
        alone = torch.stack([m(probe[:, i]) for i, m in enumerate(copies)], dim=1)
        try:
            together = wide(probe.flatten(1, 2)).view_as(alone)
        except RuntimeError as exc:
            raise NotStackable(f"the wide network does not run: {exc}") from None
    if not torch.allclose(together, alone, rtol=1e-3, atol=1e-4):
        raise NotStackable("the models' channels mix in the wide network (a layer acts across channels)")
    return wide.train(models[0].training)
