"""Train an MLP with per-sample clipped gradients through the bk_dp backend and check it against torch.func.

Run: python examples/train_mlp.py
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import bkcompile

torch.manual_seed(0)
R = 1.0
model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))
reference = {k: v.detach().clone() for k, v in model.named_parameters()}
compiled = torch.compile(
    model, backend="bk_dp", options={"max_grad_norm": R, "compiler": "aot_eager", "loss_reduction": "mean"}
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
w_true = torch.randn(16, 4)

for step in range(20):
    batch = int(torch.randint(8, 64, ()))
    x = torch.randn(batch, 16)
    y = (x @ w_true).argmax(1)
    bkcompile.mark_batch_dynamic(x)  # one graph for every batch size
    loss = F.cross_entropy(compiled(x), y)
    optimizer.zero_grad()
    loss.backward()  # p.grad = sum_i min(1, R/||g_i||) g_i
    norms = bkcompile.last_per_sample_norms()
    if step == 0:
        params = {k: v.detach() for k, v in model.named_parameters()}

        def sample_loss(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
        n = torch.stack([v.flatten(1).pow(2).sum(1) for v in g.values()]).sum(0).sqrt()
        c = (R / (n + 1e-6)).clamp(max=1)
        err = max(
            (model.get_parameter(k).grad - torch.einsum("b,b...->...", c, v)).abs().max().item() for k, v in g.items()
        )
        print(f"step 0: max |bk_dp - torch.func oracle| = {err:.2e}")
    for p in model.parameters():
        p.grad /= batch  # average the clipped sum (a DP optimizer would add noise here)
    optimizer.step()
    print(f"step {step:2d}  batch {batch:2d}  loss {loss.item():.3f}  clipped {(norms > R).float().mean():.0%}")
