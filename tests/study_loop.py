"""The straightforward trainer, as the study's code trains a shadow model: the yardstick for ours.

torchvision transforms on PIL images inside a DataLoader (RandomCrop with padding,
RandomHorizontalFlip, ToTensor, Normalize), float32, one model at a time, SGD with
CosineAnnealingLR stepped per epoch, a fresh shuffle of the model's members each epoch.
Used by the test that checks our trainer learns as well (benchmarks/pool_training.py times its own copy).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms.functional import to_pil_image

from mia_ptq_bench.data import ImageDataset
from mia_ptq_bench.spec.schema import TaskSpec


class _Members(Dataset):
    def __init__(self, dataset: ImageDataset, members: np.ndarray, transform) -> None:
        self.images, self.labels = dataset.pool.images, dataset.pool.labels
        self.members, self.transform = members, transform

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int):
        index = int(self.members[i])
        image = self.images[index]
        pil = to_pil_image(image[0] if image.shape[0] == 1 else image)
        return self.transform(pil), int(self.labels[index])


def reference_transform(spec: TaskSpec, dataset: ImageDataset) -> transforms.Compose:
    side = dataset.input_shape[1]
    steps: list = []
    if spec.training.augment.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    if spec.training.augment.crop_padding:
        steps.append(transforms.RandomCrop(side, padding=spec.training.augment.crop_padding))
    steps += [transforms.ToTensor(), transforms.Normalize(dataset.mean, dataset.std)]
    return transforms.Compose(steps)


def train_reference(spec: TaskSpec, dataset: ImageDataset, model: nn.Module, members: np.ndarray,
                    device: str | torch.device = "cpu", workers: int = 0, seed: int = 0) -> nn.Module:
    recipe = spec.training
    loader = DataLoader(_Members(dataset, members, reference_transform(spec, dataset)), batch_size=recipe.batch_size,
                        shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(seed),
                        pin_memory=torch.device(device).type == "cuda")
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    for _ in range(recipe.epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if recipe.schedule == "cosine":
            schedule.step()
    return model.eval()
