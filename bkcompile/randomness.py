"""Random generators whose draws must stay secret: Poisson sampling and DP noise.

Amplification by subsampling assumes nobody can predict which examples a step used, and the Gaussian
mechanism assumes nobody knows the noise. Both are drawn from generators seeded with 63 bits of OS
entropy (``secrets``), never from torch's global generator (which ``torch.manual_seed`` makes
predictable). Passing a seeded ``torch.Generator`` instead is a reproducibility option for debugging
and tests: whoever knows the seed knows the batches or the noise.
"""

from __future__ import annotations

import secrets

import torch
import torch.distributed as dist

from bkcompile.runtime.distributed import world_size


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from OS entropy (unaffected by ``torch.manual_seed``)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def child_generators(parent: torch.Generator | None, count: int) -> list[torch.Generator]:
    """``count`` independent generators for separate streams (batches, noise): seeded from ``parent`` (a
    reproducible run), or from OS entropy when it is None. Separate streams keep each reproducible on its
    own, whatever order the draws interleave in (data-loader workers prefetch batches)."""
    if parent is None:
        return [secret_generator() for _ in range(count)]
    seeds = torch.randint(2**62, (count,), generator=parent, device=parent.device).tolist()
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def shared_generator(generator: torch.Generator | None) -> torch.Generator:
    """A generator in the same state on every rank: rank 0's ``generator`` (OS entropy when None).

    Outside a process group the generator is returned as it is (seeded from OS entropy when None).
    The state is broadcast into ``generator`` itself, so an object shared by the loader and the
    optimizer stays one stream.
    """
    if generator is None:
        generator = secret_generator()  # OS entropy: only rank 0's survives the broadcast
    if world_size() > 1:
        state = [generator.get_state()]
        dist.broadcast_object_list(state, src=0)
        generator.set_state(state[0])
    return generator
