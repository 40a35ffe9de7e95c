"""The language's numeric limits, in one place: 64-bit integers, positions, and saturated arguments.

Integers are exact, or the program is rejected at the expression that leaves their range:
constants and arguments (folded at compile time, or evaluated on the host once n is known) are
Python integers below EXACT in magnitude, which bounds the cost of folding (`2**4000` squared
twenty times is an error, not 2 GB); every sub-expression of where(...), which numpy and the
kernels compute with 64-bit integers, must fit in +-INT_MAX for the call's rows, keys and heads
(expr.bounds, checked when the lengths are known).

Lengths and positions are bounded so that the kernels' int32 coordinates never overflow: n_q and
n_k are at most POSITIONS, query positions p = i + q_offset lie in (-POSITIONS, POSITIONS) and keys
in [0, POSITIONS). Offsets p - j then lie strictly inside +-SATURATED, so an argument compared with
positions or offsets (a band's width, a chunk's length, a global count...) means the same once
clamped to +-SATURATED: `saturate` is exact, and every such argument fits an int32.
"""
from __future__ import annotations

INT_MAX = (1 << 63) - 1          # where(...) computes in int64: every value within -INT_MAX..INT_MAX
EXACT = 1 << 256                 # constants and arguments: exact Python integers below this
POSITIONS = 1 << 30              # n_q, n_k <= POSITIONS; |p| < POSITIONS; 0 <= j < POSITIONS
SATURATED = (1 << 31) - 1        # beyond every offset |p - j| <= 2 * POSITIONS - 2
NESTING = 100                    # nested operations in an expression or pattern, as written or inlined
IR_NODES = 10_000                # a pattern's nodes once its named parts are written out
EXPR_NODES = 10_000              # an argument's operations once its lets are written out


def saturate(x: int) -> int:
    """x clamped to +-SATURATED: the same mask for every argument compared with positions."""
    return max(-SATURATED, min(SATURATED, x))


def check_lengths(n_q: int, n_k: int, q_offset: int) -> str | None:
    """Why these lengths are out of bounds, or None."""
    if n_q > POSITIONS or n_k > POSITIONS:
        return f"n_q and n_k must be at most 2**30, got n_q={n_q}, n_k={n_k}"
    if q_offset <= -POSITIONS or q_offset + n_q > POSITIONS:
        return (f"query positions q_offset .. q_offset + n_q - 1 must lie within (-2**30, 2**30), got q_offset="
                f"{q_offset} with n_q={n_q}")
    return None
