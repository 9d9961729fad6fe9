"""Quickstart: an MLP on scikit-learn's digits, trained with differential privacy to a target epsilon.

Run: python examples/quickstart.py   (prints epsilon, delta, private and non-private test accuracy)
"""

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import bkcompile

EPSILON, DELTA, EPOCHS, BATCH, R, LR = 8.0, 1e-5, 40, 128, 1.0, 2.0


def load_data() -> list[torch.Tensor]:
    """Digits scaled to [0, 1], split 80/20 the same way every time: ``[x_train, x_test, y_train, y_test]``."""
    digits = load_digits()
    return train_test_split(
        torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target), test_size=0.2, random_state=0
    )


def build_model() -> nn.Module:
    """The MLP 64-64-10, initialised from torch's global random generator."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def make_loader(x: torch.Tensor, y: torch.Tensor) -> torch.utils.data.DataLoader:
    """The (non-private) training loader; its batch size is the expected batch size of private training."""
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def make_private_sgd(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    epochs: int = EPOCHS,
    generator: torch.Generator | None = None,
    compiler: str = "inductor",
):
    """bkcompile.make_private with the quickstart's settings (SGD, R, epsilon and delta over ``epochs``, the
    ``compiler`` inside bk_dp)."""
    return bkcompile.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0),
        loader,
        max_grad_norm=R,
        target_epsilon=EPSILON,
        target_delta=DELTA,
        epochs=epochs,
        generator=generator,
        loss_reduction="mean",  # the training loop's F.cross_entropy(model(x), y): a mean over the batch
        compiler=compiler,
    )


def train(model: nn.Module, optimizer, loader, epochs: int, desc: str) -> list[float]:
    """Cross-entropy training; an empty (Poisson) batch skips the backward but still steps. Returns each
    epoch's wall time in seconds (the first includes compiling the model)."""
    seconds = []
    for _ in tqdm(range(epochs), desc=desc):
        start = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad()
            if len(x):
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``net`` classifies as ``y``."""
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    x_train, x_test, y_train, y_test = load_data()
    model = build_model()
    baseline = copy.deepcopy(model)
    loader = make_loader(x_train, y_train)

    private_model, optimizer, private_loader = make_private_sgd(model, loader)
    print(f"noise multiplier {optimizer.noise_multiplier:.3f} for epsilon {EPSILON} after {EPOCHS} epochs")
    train(private_model, optimizer, private_loader, EPOCHS, "private training")
    train(baseline, torch.optim.SGD(baseline.parameters(), lr=0.1), loader, EPOCHS, "non-private training")

    epsilon = optimizer.accountant.get_epsilon(DELTA)
    print(f"epsilon = {epsilon:.2f}, delta = {DELTA}")
    print(
        f"test accuracy: private {accuracy(model, x_test, y_test):.3f}, "
        f"non-private {accuracy(baseline, x_test, y_test):.3f}"
    )


if __name__ == "__main__":
    main()
