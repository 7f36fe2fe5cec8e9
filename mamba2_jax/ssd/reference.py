"""Oracle SSD: a per-token ``lax.scan`` over the sequence.

Per head, in the accumulation dtype (float32, or float64 end to end for float64
inputs, which makes this exact up to float64 rounding):

    h_t = keep_t * exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t      h: (P, N)
    y_t = h_t @ C_t

with keep_t = 0 where a new segment starts (t > 0 and the run index changes) and
h_{-1} = initial_state or 0. The D skip is added by the caller (api.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .common import Prepared, expand_groups

__all__ = ["reference_core"]

_HI = lax.Precision.HIGHEST


def reference_core(p: Prepared, *, chunk_size: int | None = None):
    """Returns (y without the D term, final_state); both in ``p.acc``.

    ``chunk_size`` is accepted for signature compatibility and ignored.
    """
    del chunk_size
    acc = p.acc
    b, L, H, P = p.x.shape
    N = p.B.shape[-1]
    x = p.x.astype(acc)
    Bh = expand_groups(p.B.astype(acc), H)  # (b, L, H, N)
    Ch = expand_groups(p.C.astype(acc), H)
    decay = jnp.exp(p.dt * p.A)  # (b, L, H); dt*A <= 0 so no overflow
    if p.seg is not None:
        start = jnp.concatenate(
            [jnp.zeros((b, 1), bool), p.seg[:, 1:] != p.seg[:, :-1]], axis=1
        )
        decay = jnp.where(start[..., None], jnp.zeros((), acc), decay)
    h0 = jnp.zeros((b, H, P, N), acc) if p.initial_state is None else p.initial_state

    def step(h, inp):
        a_t, dt_t, x_t, B_t, C_t = inp
        h = a_t[:, :, None, None] * h + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        y_t = jnp.einsum("bhpn,bhn->bhp", h, C_t, precision=_HI)
        return h, y_t

    tm = lambda t: jnp.moveaxis(t, 1, 0)  # time-major
    h_last, ys = lax.scan(step, h0, (tm(decay), tm(p.dt), tm(x), tm(Bh), tm(Ch)))
    return jnp.moveaxis(ys, 0, 1), h_last
