"""Quickstart: an MLP on scikit-learn's digits, trained with differential privacy to a target epsilon.

Run: python examples/quickstart.py   (prints epsilon, delta, private and non-private test accuracy)
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import bkcompile

EPSILON, DELTA, EPOCHS, BATCH, R, LR = 8.0, 1e-5, 40, 128, 1.0, 2.0

torch.manual_seed(0)
digits = load_digits()
x_train, x_test, y_train, y_test = train_test_split(
    torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target), test_size=0.2, random_state=0)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
baseline = copy.deepcopy(model)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=BATCH)


def accuracy(net: nn.Module) -> float:
    with torch.no_grad():
        return (net(x_test).argmax(1) == y_test).float().mean().item()


private_model, optimizer, private_loader = bkcompile.make_private(
    model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0), loader,
    max_grad_norm=R, target_epsilon=EPSILON, target_delta=DELTA, epochs=EPOCHS, compiler="aot_eager")
print(f"noise multiplier {optimizer.noise_multiplier:.3f} for epsilon {EPSILON} after {EPOCHS} epochs")
for epoch in tqdm(range(EPOCHS), desc="private training"):
    for x, y in private_loader:
        optimizer.zero_grad()
        if len(x):
            F.cross_entropy(private_model(x), y).backward()
        optimizer.step()

plain = torch.optim.SGD(baseline.parameters(), lr=0.1)
for epoch in tqdm(range(EPOCHS), desc="non-private training"):
    for x, y in loader:
        plain.zero_grad()
        F.cross_entropy(baseline(x), y).backward()
        plain.step()

epsilon = optimizer.accountant.get_epsilon(DELTA)
print(f"epsilon = {epsilon:.2f}, delta = {DELTA}")
print(f"test accuracy: private {accuracy(model):.3f}, non-private {accuracy(baseline):.3f}")
