"""The data and the model: synthetic 16x16 images of 4 shapes, made offline, and a small CNN."""

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)  # several nodes share this machine's cores
SHAPES = ("horizontal bar", "vertical bar", "diagonal", "square")
SIZE = 16


def make_images(num: int, seed: int, classes=(0, 1, 2, 3)):
    """``num`` noisy images of the given shapes at random places; no download needed."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(list(classes), size=num)
    images = rng.normal(0.0, 0.3, size=(num, 1, SIZE, SIZE)).astype(np.float32)
    for image, label in zip(images, labels, strict=True):
        r, c = rng.integers(2, SIZE - 8, size=2)
        if label == 0:
            image[0, r, c : c + 8] += 1.0
        elif label == 1:
            image[0, r : r + 8, c] += 1.0
        elif label == 2:
            image[0, np.arange(r, r + 6), np.arange(c, c + 6)] += 1.0
        else:
            image[0, r : r + 5, c : c + 5] += 1.0
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_partition(partition_id: int, num_partitions: int):
    """This node's images: non-IID, the node sees mostly 2 of the 4 shapes."""
    common = [partition_id % len(SHAPES), (partition_id + 1) % len(SHAPES)]
    x1, y1 = make_images(240, seed=100 + partition_id, classes=common)
    x2, y2 = make_images(60, seed=200 + partition_id)
    return torch.cat([x1, x2]), torch.cat([y1, y2])


def load_test_set():
    return make_images(400, seed=1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Linear(16 * 4 * 4, len(SHAPES))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def get_weights(net: nn.Module):
    return [value.cpu().numpy() for value in net.state_dict().values()]


def set_weights(net: nn.Module, weights) -> None:
    keys = net.state_dict().keys()
    net.load_state_dict(
        OrderedDict((k, torch.tensor(v)) for k, v in zip(keys, weights, strict=True))
    )


def train(net: nn.Module, x, y, epochs: int, lr: float = 0.05) -> float:
    """SGD on mini-batches of 32; returns the last epoch's mean loss."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(y)).split(32):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    return total / len(y)


@torch.no_grad()
def test(net: nn.Module, x, y):
    """Loss and accuracy of the model on (x, y)."""
    net.eval()
    logits = net(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return loss, accuracy
