"""Time the jitted RoPE forward of queries and keys against a memory-bound floor and two baselines.

Every contender is a jitted function of ``(q, k, positions)`` returning the rotated ``(q, k)``:

* ``floor``: ``x * c`` over the same arrays, which reads and writes each element once, like RoPE.
* ``flax_nnx cached``: this project's ``RoPE(embedding_size=D, max_seq_len=S)``, reading tables.
* ``flax_nnx computed``: ``RoPE()``, computing cos and sin from the positions in every call.
* ``equinox``: ``eqx.nn.RotaryPositionalEmbedding`` vmapped over batch and heads.
* ``textbook``: ``x * cos + rotate_half(x) * sin`` with full-width tables and concatenated halves.

The contenders are timed round-robin, so that load from other processes on a shared machine
slows all of them alike, and the ratios to the floor come from this one run.

Usage::

    python benchmarks/bench_flax_rope.py            # [4, 2048, 16, 128], float32 and bfloat16
    python benchmarks/bench_flax_rope.py --quick    # a small smoke size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

# The script runs as a file, so the repository root is not on sys.path by default.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from impls.flax_nnx import RoPE  # noqa: E402

FULL_SHAPE = (4, 2048, 16, 128)
QUICK_SHAPE = (1, 64, 2, 16)
THETA = 10_000.0

# Targets, as ratios of the median time of the floor.
MAX_RATIO_TO_FLOOR = 1.5
MIN_SPEEDUP_OVER_EQUINOX = 2.0

Contender = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def make_floor() -> Contender:
    """Return ``x * c`` over q and k, with ``c`` a traced scalar so XLA cannot fold it away."""

    @jax.jit
    def floor(q, k, positions):
        del positions
        c = jnp.asarray(1.0001, q.dtype)
        return q * c, k * c

    return floor


def make_flax(cached: bool, shape: tuple[int, ...]) -> Contender:
    """Return this project's RoPE over q and k, with tables when ``cached``."""
    _, seq, _, head_dim = shape
    if cached:
        rope = RoPE(THETA, embedding_size=head_dim, max_seq_len=seq)
    else:
        rope = RoPE(THETA)

    @jax.jit
    def flax_rope(q, k, positions):
        return rope(q, positions), rope(k, positions)

    return flax_rope


def make_equinox(shape: tuple[int, ...]) -> Contender:
    """Return Equinox's RoPE, which takes one ``[seq, head_dim]`` array, vmapped over batch and heads."""
    head_dim = shape[-1]
    eqx.clear_caches()
    rope = eqx.nn.RotaryPositionalEmbedding(head_dim, theta=THETA)
    # [B, S, H, D]: the inner vmap maps heads (axis 1 of [S, H, D]), the outer one maps batch.
    per_example = jax.vmap(rope, in_axes=1, out_axes=1)
    batched = jax.vmap(per_example)

    @jax.jit
    def equinox_rope(q, k, positions):
        del positions  # Equinox always uses positions 0 .. S - 1.
        return batched(q), batched(k)

    return equinox_rope


def make_textbook(shape: tuple[int, ...]) -> Contender:
    """Return ``x * cos + rotate_half(x) * sin`` with tables computed in the call."""
    head_dim = shape[-1]
    inv_freq = 1.0 / (THETA ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))

    def rotate_half(x):
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return jnp.concatenate([-second, first], axis=-1)

    def apply(x, cos, sin):
        # Computed in float32 and rounded once, as the other contenders do.
        x32 = x.astype(jnp.float32)
        return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)

    @jax.jit
    def textbook(q, k, positions):
        angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
        angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [B, S, 1, D]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        return apply(q, cos, sin), apply(k, cos, sin)

    return textbook


def time_round_robin(
    contenders: dict[str, Contender], args: tuple[jax.Array, ...], warmup: int, repeats: int
) -> dict[str, float]:
    """Return the median wall time in seconds of each contender, timed in interleaved rounds."""
    for fn in contenders.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def run(shape: tuple[int, ...], dtype_name: str, warmup: int, repeats: int, check_targets: bool) -> bool:
    """Time every contender at ``shape`` and ``dtype_name``, print a table, and return whether targets hold."""
    dtype = jnp.dtype(dtype_name)
    batch, seq, _, _ = shape
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)
    k = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

    contenders = {
        "floor (x * c)": make_floor(),
        "flax_nnx cached": make_flax(True, shape),
        "flax_nnx computed": make_flax(False, shape),
        "equinox (vmapped)": make_equinox(shape),
        "textbook": make_textbook(shape),
    }
    medians = time_round_robin(contenders, (q, k, positions), warmup, repeats)

    floor = medians["floor (x * c)"]
    equinox = medians["equinox (vmapped)"]
    print(f"\nq and k of shape {list(shape)}, {dtype_name}, median of {repeats} rounds:")
    print(f"  {'contender':<20} {'ms':>9} {'x floor':>8} {'equinox / this':>15}")
    for name, seconds in medians.items():
        print(f"  {name:<20} {seconds * 1e3:9.2f} {seconds / floor:8.2f} {equinox / seconds:15.2f}")

    if not check_targets:
        return True
    targets_met = True
    for name in ("flax_nnx cached", "flax_nnx computed"):
        ratio, speedup = medians[name] / floor, equinox / medians[name]
        met = ratio <= MAX_RATIO_TO_FLOOR and speedup >= MIN_SPEEDUP_OVER_EQUINOX
        targets_met &= met
        verdict = "met" if met else "MISSED"
        print(
            f"  {name}: {ratio:.2f}x floor (target <= {MAX_RATIO_TO_FLOOR}), {speedup:.2f}x faster "
            f"than equinox (target >= {MIN_SPEEDUP_OVER_EQUINOX}): {verdict}"
        )
    return targets_met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"time shape {list(QUICK_SHAPE)} with 3 rounds (a smoke run)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per contender (default 15, 3 with --quick)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="input dtypes to time")
    args = parser.parse_args(argv)

    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = 1 if args.quick else 2
    print(f"jax {jax.__version__}, equinox {eqx.__version__}, backend {jax.default_backend()}")

    # Dispatch overhead dominates the quick size, so its ratios are no test of the targets.
    check_targets = not args.quick
    all_met = True
    for dtype_name in args.dtypes:
        all_met &= run(shape, dtype_name, warmup, repeats, check_targets)
    if check_targets:
        print("\nall targets met" if all_met else "\nsome targets MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
