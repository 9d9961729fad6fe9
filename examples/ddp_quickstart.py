"""The quickstart on several processes: DistributedDataParallel, one noise draw per step for all ranks.

Run: torchrun --nproc_per_node 2 examples/ddp_quickstart.py   (gloo on CPU, NCCL when CUDA is present)

Every rank loads the whole dataset; ``make_private`` sees the process group and returns
``DDP(torch.compile(model, backend="bk_dp"))``, a DPOptimizer whose noise generator is rank 0's, and a
loader that splits one global Poisson batch (expected size 128, as in the single-process quickstart)
across the ranks. The noise multiplier, the epsilon and the accuracy are those of the single-process
run. Rank 0 prints them.
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from quickstart import DELTA, EPOCHS, EPSILON, accuracy, build_model, load_data, make_loader, make_private_sgd
from tqdm import tqdm


def train(model, optimizer, loader, epochs: int, show: bool) -> None:
    """Every rank runs forward and backward at every step, an empty local batch too (DDP all-reduces)."""
    for _ in tqdm(range(epochs), desc="private training (DDP)", disable=not show):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()  # an empty batch gives zero gradients
            optimizer.step()


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    x_train, x_test, y_train, y_test = (t.to(device) for t in load_data())
    model = build_model().to(device)
    private_model, optimizer, loader = make_private_sgd(model, make_loader(x_train, y_train))
    if rank == 0:
        print(
            f"{dist.get_world_size()} ranks ({dist.get_backend()}); noise multiplier {optimizer.noise_multiplier:.3f}"
        )
    train(private_model, optimizer, loader, EPOCHS, show=rank == 0)
    if rank == 0:
        print(f"epsilon = {optimizer.accountant.get_epsilon(DELTA):.2f}, delta = {DELTA} (target {EPSILON})")
        print(f"test accuracy: private {accuracy(model, x_test, y_test):.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
