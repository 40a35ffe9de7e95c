"""TileConfig: the tile sizes and launch options of one kernel launch, checked when made."""
from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    """The kernels' tile sizes and launch options, passed at launch (runtime/tuning.py picks them
    on a GPU; the defaults are what a GPU call with D <= 128 uses). Every field is checked when
    the config is made (powers of two 16..256 for the tiles, a power of two 1..16 warps, 1..8
    stages): a config read from the tuning cache or given by a user can only ever be one of those."""
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "num_warps", "num_stages"):
            x = getattr(self, name)
            if isinstance(x, numbers.Integral) and not isinstance(x, bool):
                object.__setattr__(self, name, int(x))   # numpy ints print as np.int64(...)

        def pow2(x, lo, hi):
            return type(x) is int and lo <= x <= hi and x & (x - 1) == 0
        if not (pow2(self.block_m, 16, 256) and pow2(self.block_n, 16, 256) and pow2(self.num_warps, 1, 16)
                and type(self.num_stages) is int and 1 <= self.num_stages <= 8):
            raise ValueError(f"a tile config has block_m and block_n powers of two in 16..256, num_warps a power "
                             f"of two in 1..16 and num_stages in 1..8, got {self!r}")

    def show(self) -> str:
        return (f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} num_warps={self.num_warps} "
                f"num_stages={self.num_stages}")
