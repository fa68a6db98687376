"""The precision budget of the stored float columns: how many significand bits each keeps, and the rounding.

A float's significand rounded to `k` explicit bits (to nearest; the bits below zeroed) keeps its type, so any
Parquet reader reads it as before, while the zeroed low bytes cost next to nothing once the column is written
byte-stream-split and zstd-compressed (the "bit rounding" of netCDF's quantize and numcodecs' BitRound). The error
is at most 2^-(k+1) of the value: with x = f 2^e, 1/2 <= |f| < 1, the kept grid step is 2^(e-1-k).

Budgets (`encoding.py` says which frame column is stored how; docs/contract.md, "The run directory"):

    FIGURE_BITS          15 of float32's 23: 2^-16 (1.5e-5) relative. Columns only figures and the equilibrium
                         regime check read (grad_norm, angular_update, the equilibrium columns) and the relative
                         error's denominator (norm): five significant digits, 60x finer than a figure resolves
                         (1e-3 of an axis) and than any tolerance the project applies to them.
    BREAKING_TERM_BITS   36 of float64's 52: 2^-37 (7.3e-12) relative. B_k is compared with float64 references
                         at 1e-10 of max(1, |B|) and 1e-9 relative, 14x coarser.
    DELTA_NORM_BITS      a prediction's stored deviation from `measured` (float32) keeps the bits that matter at
    DELTA_MIN_BITS       2^-37 of the group's norm: k = clip(e_delta - e_norm + 36, 8, 23), so its error is at most
                         max(2^-37 norm, 2^-24 |delta|) (the second: float32 itself) and at most 2^-9 |delta|.
                         Every check of a prediction reads |prediction - measured| / norm: the tightest, the exact
                         recurrence against a float64 reference at 1e-10 of the norm (1e-9 for a resumed run
                         against an uninterrupted one), is 14x coarser; the error figures (log axes) read the
                         deviation itself to 2^-9, 0.002 decades. A deviation at float32 rounding of the norm (a
                         float32 model's exact predictions) keeps 12 bits instead of 23.

Rounding is idempotent (a stored value stores again unchanged): the grid is fixed by the budget, and a deviation
rounded up to the next power of two lands on the coarser grid's point. Non-finite and subnormal values are kept as
they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BREAKING_TERM_BITS", "DELTA_MIN_BITS", "DELTA_NORM_BITS", "FIGURE_BITS", "delta_bits",
           "round_significand"]

FIGURE_BITS = 15
BREAKING_TERM_BITS = 36
DELTA_NORM_BITS = 36
DELTA_MIN_BITS = 8

_UINT: dict[np.dtype[Any], type[np.unsignedinteger[Any]]] = {np.dtype(np.float32): np.uint32,
                                                         np.dtype(np.float64): np.uint64}


def round_significand(x: np.ndarray, keep: Any) -> np.ndarray:
    """`x` (float32 or float64) with its significand rounded to nearest at `keep` explicit bits (an int or one per
    value; at least the type's own bits: unchanged), the bits below zero: |error| <= 2^-(keep+1) |x|. Non-finite
    values, subnormal ones (their significand has fewer bits than `keep` counts) and a value that would round to
    infinity are returned as they are."""
    x = np.asarray(x)
    uint = _UINT[x.dtype]
    nmant = np.finfo(x.dtype).nmant
    drop = (nmant - np.clip(np.asarray(keep, dtype=np.int64), 0, nmant)).astype(uint)
    one = np.ones((), dtype=uint)
    step = np.left_shift(one, drop)  # the kept grid step, in units of the last significand bit
    bits = x.view(uint)
    rounded = ((bits + (step >> one)) & ~(step - one)).astype(uint).view(x.dtype)
    with np.errstate(invalid="ignore"):
        normal = np.isfinite(x) & np.isfinite(rounded) & (np.abs(x) >= np.finfo(x.dtype).smallest_normal)
    return np.where(normal, rounded, x)


def delta_bits(delta: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Significand bits a stored deviation keeps: clip(e_delta - e_norm + DELTA_NORM_BITS, DELTA_MIN_BITS, 23), with
    e the binary exponents (numpy.frexp); 23 (float32 as it is) where the norm is zero or not finite."""
    _, e_delta = np.frexp(np.asarray(delta, dtype=np.float64))
    norm = np.asarray(norm, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(norm) & (norm > 0)
    _, e_norm = np.frexp(np.where(usable, norm, 1.0))
    keep = np.clip(e_delta.astype(np.int64) - e_norm + DELTA_NORM_BITS, DELTA_MIN_BITS, 23)
    return np.where(usable, keep, 23)
