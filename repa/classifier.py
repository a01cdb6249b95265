"""An independent judge of generated samples: a small CNN trained on real held-out images.

Why: on a CPU there is no published network to score samples with (FID's Inception is random
there), and a random network's Fréchet distance cannot say whether a sample *looks like* its class.
A classifier can: the share of class-conditional samples that it labels as the class they were drawn
for is a number a newcomer can read (chance = 1 / classes). To make it judge shape, not colour or
brightness, it sees every image in grayscale and standardised per image (zero mean, unit variance).
It shares nothing with the REPA target encoder: its own architecture, its own weights, trained on
images the diffusion model never sees (Fashion-MNIST's test split in `repa demo`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["SampleClassifier", "accuracy", "standardise", "train_classifier"]


SIDE = 16  # the judge sees 16 x 16: garments keep their shape, and training takes seconds on a CPU


def standardise(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (N, H, W) -> float (N, 1, 16, 16): grayscale, area-resized, per image zero
    mean and unit standard deviation."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim == 4:
        x = x.mean(dim=-1)  # colour carries no information the judge may use
    x = nn.functional.interpolate(x.unsqueeze(1), size=(SIDE, SIDE), mode="area")
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-3 * 255)  # an all-flat image stays flat, not noise blown up


class SampleClassifier(nn.Module):
    """Three conv blocks (16-32-64 channels) on 16 x 16 -> global average pool -> linear: ~25k parameters."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(block(1, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(64, num_classes)
        self.num_classes = num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) standardised -> (N, 64) pooled features (FD in these features: benchmarks)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 images -> predicted labels (N,)."""
        self.eval()
        out = [
            self(standardise(images[i : i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out).numpy()


@dataclasses.dataclass
class TrainReport:
    epochs: int
    train_images: int


def train_classifier(
    images: np.ndarray, labels: np.ndarray, num_classes: int, *, epochs: int = 15, seed: int = 0
) -> tuple[SampleClassifier, TrainReport]:
    """Train on uint8 images (N, H, W[, 3]) with labels (N,): Adam, batch 64, random shifts of up to 1 px."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SampleClassifier(num_classes)
    x, y = standardise(images), torch.as_tensor(labels, dtype=torch.long)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = epochs * -(-len(x) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
            batch = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(batch), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model, TrainReport(epochs, len(x))


def accuracy(model: SampleClassifier, images: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """The share of ``images`` that ``model`` labels as ``labels``."""
    if len(images) == 0:
        raise ValueError("accuracy of no images")
    return float(np.mean(model.predict(images) == np.asarray(labels)))
