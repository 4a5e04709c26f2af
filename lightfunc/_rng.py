"""Randomness carried in the state.

A run's randomness is an `RngKey(seed, counter)`: two Python ints kept in the
train state. Each built step derives one 64-bit seed from the key, seeds
torch's global generators with it for the duration of the step only (the
caller's generator state is restored afterwards), and returns the state with
the counter advanced. So `nn.Dropout` and `torch.rand` inside a step,
compiled or eager, draw the same numbers run after run and after a resume,
and no per-step seed ever has to be read back from the device.

Why not a generator inside the compiled graph: creating or seeding a
`torch.Generator` inside a `fullgraph` region fails in torch 2.13; seeding the
global generator around the call works, and inductor draws its own random
seeds from that generator at the start of each graph call.

The key holds no tensors: it is a pytree node with no children (its ints
live in the tree structure), so `tree_map` over a state never touches it and
it is never traced into a compiled graph.
"""

from __future__ import annotations

import dataclasses

import optree
import torch

from ._tree import NAMESPACE

_MASK64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class RngKey:
    """Position in a run's random stream.

    Attributes:
        seed: the run's seed, as given to `TrainState.create` (any int).
        counter: number of steps that have drawn from the stream so far.
    """

    seed: int
    counter: int = 0

    def next(self) -> RngKey:
        """The key for the following step."""
        return RngKey(self.seed, self.counter + 1)

    def step_seed(self) -> int:
        """A well-mixed 63-bit seed for this key's step (splitmix64 of seed and counter)."""
        z = (self.seed * 0x9E3779B97F4A7C15 + self.counter + 1) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return (z ^ (z >> 31)) >> 1


def _flatten_key(key: RngKey) -> tuple[tuple[()], tuple[int, int], tuple[()]]:
    return (), (key.seed, key.counter), ()


def _unflatten_key(aux: tuple[int, int], children: object) -> RngKey:
    return RngKey(*aux)


optree.register_pytree_node(RngKey, _flatten_key, _unflatten_key, namespace=NAMESPACE)  # type: ignore[arg-type]


class seeded:
    """Seed torch's CPU (and `device`'s CUDA) generator from `key` for a `with` block, then restore it.

    A class rather than a generator-based context manager: it runs every step.
    """

    def __init__(self, key: RngKey, device: torch.device | None = None) -> None:
        self.seed = key.step_seed()
        self.cuda = device if device is not None and device.type == "cuda" else None

    def __enter__(self) -> None:
        self.cpu_state = torch.default_generator.get_state()
        torch.default_generator.manual_seed(self.seed)
        if self.cuda is not None:
            self.cuda_state = torch.cuda.get_rng_state(self.cuda)
            with torch.cuda.device(self.cuda):
                torch.cuda.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.default_generator.set_state(self.cpu_state)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.cuda)
