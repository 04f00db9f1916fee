"""Run a model over a split: logits per query, membership scores, test accuracy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn

from ..data import ImageDataset, Split
from .confidence import logit_scaled_confidence
from .queries import QUERIES


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, its own mode back afterwards (also when the block raises)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: ImageDataset, split: Split, query: str = "identity",
                   device: str | torch.device = "cpu", batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, C) in float32 on the CPU for every image of ``split`` under one query."""
    transform = QUERIES.get(query)
    outputs = []
    with eval_mode(model):
        for start in range(0, len(split), batch_size):
            images = split.images[start : start + batch_size].to(device, non_blocking=True)
            outputs.append(model(transform(dataset.normalize(images))).float().cpu())
    return torch.cat(outputs)


def score_split(model: nn.Module, dataset: ImageDataset, split: Split, queries: list[str],
                device: str | torch.device = "cpu") -> np.ndarray:
    """Logit-scaled confidence (N, Q) in float64 for every image and query."""
    labels = split.labels.cpu().numpy()
    columns = [logit_scaled_confidence(predict_logits(model, dataset, split, q, device).numpy(), labels) for q in queries]
    return np.stack(columns, axis=1)


def accuracy(model: nn.Module, dataset: ImageDataset, split: Split, device: str | torch.device = "cpu") -> float:
    predictions = predict_logits(model, dataset, split, "identity", device).argmax(dim=1)
    return float((predictions == split.labels.cpu()).double().mean())
