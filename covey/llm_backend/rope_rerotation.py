"""Move cached keys to new positions: RoPE rotations compose, so R(p') k = R(p' - p) R(p) k.

A reused chunk's keys were rotated for the positions it was computed at; blended reuse
places it elsewhere. Rotating every cached key by the same delta (new start - old start)
with the model's own inverse frequencies (Llama 3 scaling included) gives the key the
model would have produced at the new position from the same pre-rotation key. Values
carry no position and are left alone. The angles are formed in float64 and the rotation
done in float32, so a far move loses no more precision than computing the key there.
"""

from __future__ import annotations

import torch

from covey.llm_backend.layers import rope_inv_freq
from covey.llm_backend.model_args import ModelArgs


class RopeRerotator:
    """Re-rotates keys for one model's RoPE (its head size, theta and scaling)."""

    def __init__(self, args: ModelArgs) -> None:
        inv_freq = rope_inv_freq(args.dim_per_head, args.rope_theta, args.rope_scaling)
        self.inv_freq = inv_freq.double()  # [Dh / 2]

    def rotation(self, delta: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [Dh] of a rotation by `delta` positions (float32)."""
        angles = float(delta) * self.inv_freq  # float64: delta * f exactly enough
        cos, sin = angles.cos(), angles.sin()
        cos_full = torch.cat((cos, cos)).float().to(device)
        sin_full = torch.cat((-sin, sin)).float().to(device)
        return cos_full, sin_full

    def rerotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys [..., Dh] rotated by `delta` positions, in their dtype (a new tensor).

        The half-split convention of Hugging Face Llama weights, as `apply_rotary` uses.
        """
        if delta == 0:
            return keys.clone()
        cos, sin = self.rotation(delta, keys.device)
        # `apply_rotary`'s arithmetic (x * cos + roll(x) * sin, float32), in place on its
        # two float32 copies: a chunk's keys are megabytes, and fresh temporaries cost
        # page faults on every import. Same ops in the same order, so the same bits.
        x = keys.to(torch.float32, copy=True)  # a copy even of float32 keys: mutated below
        rolled = x.roll(x.shape[-1] // 2, dims=-1)
        return x.mul_(cos).add_(rolled.mul_(sin)).to(keys.dtype)

    def rerotate_kv(self, kv: torch.Tensor, delta: int) -> torch.Tensor:
        """A chunk's KV [layers, 2, KVH, n, Dh] with its keys moved by `delta` positions."""
        if delta == 0:
            return kv
        out = kv.clone()
        out[:, 0] = self.rerotate(kv[:, 0], delta)
        return out
