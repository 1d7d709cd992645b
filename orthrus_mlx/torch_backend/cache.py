"""A preallocated KV cache for all layers: fixed shapes, O(1) trim.

Keys and values live in one tensor each, `[layers, batch, kv_heads, capacity, head_dim]`.
`offset` (a host int) counts the committed entries; slots past it hold garbage that every
pass overwrites before reading (the causal mask hides the rest), so trimming only moves
`offset`. The diffusion view writes its block into the free slots `offset ...` for the pass
and leaves `offset` alone (docs/DESIGN.md section 6).
"""

from typing import Optional, Tuple

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        batch_size: int = 1,
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.offset = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def layer(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]

    def check_room(self, length: int) -> None:
        if self.offset + length > self.capacity:
            raise ValueError(
                f"The KV cache holds {self.capacity} positions: no room for {length} more "
                f"after {self.offset}."
            )

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def reset(self) -> None:
        self.offset = 0

    def mark_static(self) -> None:
        """Tell torch.compile the buffers never move, so CUDA graphs may capture their writes."""
        torch._dynamo.mark_static_address(self.keys)
        torch._dynamo.mark_static_address(self.values)
