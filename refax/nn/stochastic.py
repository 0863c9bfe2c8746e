"""Stochastic layers: :class:`Dropout`.

Dropout zeroes each input entry with probability ``rate`` and scales the kept entries by
``1 / (1 - rate)``, so the expected output equals the input. It is active in training mode
(``deterministic=False``, set by ``model.train()``) and the identity in evaluation mode
(``model.eval()``). Its randomness comes from the ``rng_collection`` stream (``'dropout'``) of an
``Rngs`` given at construction (the layer keeps a fork of that stream) or at call time; a raw
key may also be passed at call time.

Example:
  >>> import jax.numpy as jnp
  >>> from refax._rngs import Rngs
  >>> from refax.nn import Dropout
  >>> dropout = Dropout(0.5, rngs=Rngs(dropout=0))
  >>> y = dropout(jnp.ones((2, 4)))
  >>> sorted(set(y.ravel().tolist()))  # entries are dropped (0) or scaled by 1 / 0.5
  [0.0, 2.0]
  >>> dropout.deterministic = True  # what model.eval() does
  >>> dropout(jnp.ones((2, 4)))
  Array([[1., 1., 1., 1.],
         [1., 1., 1., 1.]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from refax._module import Module
from refax._rngs import Rngs, RngStream
from refax.nn import _checks

__all__ = ["Dropout"]


def _fork(rngs: Rngs | RngStream | None, rng_collection: str) -> RngStream | None:
    if rngs is None:
        return None
    if isinstance(rngs, Rngs):
        return rngs[rng_collection].fork()
    if isinstance(rngs, RngStream):
        return rngs.fork()
    raise TypeError(
        f"Dropout: rngs must be an Rngs, an RngStream or None, got {type(rngs).__name__}. "
        "Pass a key at call time instead (dropout(x, rngs=key))."
    )


def _as_dims(broadcast_dims: Iterable[int]) -> tuple[int, ...]:
    dims = None
    if isinstance(broadcast_dims, Iterable) and not isinstance(broadcast_dims, str):
        dims = tuple(broadcast_dims)
    if dims is None or not all(_checks.is_int(d) for d in dims):
        raise TypeError(
            f"Dropout: broadcast_dims must be a sequence of integer axes, got "
            f"{broadcast_dims!r}. Pass e.g. (1,) to share one mask along axis 1."
        )
    return dims


class Dropout(Module):
    """Randomly zeroes inputs with probability ``rate`` (Srivastava et al., 2014).

    Args:
      rate: probability of dropping an entry, in ``[0, 1)``.
      broadcast_dims: axes along which the same mask is shared (e.g. ``(1,)`` drops whole
        time steps of ``(batch, time, features)`` inputs).
      deterministic: True makes the layer the identity; ``None`` requires it at call time.
      rng_collection: name of the stream the masks are drawn from.
      rngs: an ``Rngs`` or ``RngStream``; the layer stores a fork of the ``rng_collection``
        stream. Optional when keys are passed at call time.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from refax.nn import Dropout
      >>> dropout = Dropout(0.5, broadcast_dims=(0,))
      >>> y = dropout(jnp.ones((3, 4)), rngs=jax.random.key(0))
      >>> bool((y == y[0]).all())  # one mask shared along axis 0
      True
    """

    def __init__(
        self,
        rate: float,
        *,
        broadcast_dims: Sequence[int] = (),
        deterministic: bool | None = False,
        rng_collection: str = "dropout",
        rngs: Rngs | RngStream | None = None,
    ):
        _checks.fraction(
            "Dropout",
            "rate",
            rate,
            "It is the fraction of entries dropped (Dropout(0.1) keeps 90%); a rate of 1 would "
            "drop every entry.",
        )
        self.rate = rate
        self.broadcast_dims = _as_dims(broadcast_dims)
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        self.rngs = _fork(rngs, rng_collection)

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: Rngs | RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """Applies dropout to ``inputs``.

        Args:
          inputs: array of any shape.
          deterministic: overrides the attribute of the same name for this call.
          rngs: an ``Rngs`` (its ``rng_collection`` stream, or ``default``, is used), an
            ``RngStream`` or a key; overrides the layer's own stream for this call.

        Returns:
          The masked and rescaled inputs (or ``inputs`` itself when deterministic).
        """
        if deterministic is None:
            deterministic = self.deterministic
        if deterministic is None:
            raise ValueError(
                "No `deterministic` argument was provided to Dropout: pass "
                "`deterministic=True/False` to the constructor or to __call__, or set it on "
                "the whole model with model.train() / model.eval()."
            )
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:  # (a traced rate) avoids 0 / 0 in the rescaling
            return jnp.zeros_like(inputs)
        key = self._key(rngs)
        keep_prob = 1.0 - self.rate
        mask_shape = list(jnp.shape(inputs))
        for dim in self.broadcast_dims:
            mask_shape[dim] = 1
        mask = jax.random.bernoulli(
            key, p=keep_prob, shape=mask_shape, out_sharding=jax.typeof(inputs).sharding
        )
        mask = jnp.broadcast_to(mask, jnp.shape(inputs))
        return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))

    def _key(self, rngs: Rngs | RngStream | jax.Array | None) -> jax.Array:
        if rngs is None:
            rngs = self.rngs
        if rngs is None:
            raise ValueError(
                "Dropout needs random keys: `deterministic` is False, but no `rngs` argument "
                "was provided to Dropout as either a __call__ argument or class attribute. "
                "Pass rngs=nnx.Rngs(dropout=0) to the constructor or to __call__, or set "
                "deterministic=True (model.eval())."
            )
        if isinstance(rngs, Rngs):
            return rngs[self.rng_collection]()
        if isinstance(rngs, RngStream):
            return rngs()
        if isinstance(rngs, jax.Array):
            return rngs
        raise TypeError(
            "Dropout: rngs must be an Rngs, an RngStream or a jax key array, got "
            f"{type(rngs).__name__}."
        )

    def set_view(self, deterministic: bool | None = None) -> None:
        """Hook used by ``nnx.view``: sets ``deterministic`` when given.

        Args:
          deterministic: True: return the inputs unchanged (evaluation); False: drop entries
            (training).
        """
        if deterministic is not None:
            self.deterministic = deterministic
