"""refax demo: train a classifier end to end on a generated two-spirals data set.

Run with ``make demo``. It shows the whole stack: Modules holding Variables (Linear,
BatchNorm, Dropout), ``nnx.Rngs``, a training step under ``nnx.jit`` with ``nnx.value_and_grad``
and ``nnx.Optimizer`` (state changes such as BatchNorm statistics and Dropout keys propagate
back to the Python objects), ``model.eval()`` for inference, and the functional API
(``split``/``merge``) to evaluate the trained model under a plain ``jax.jit``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from refax import nnx


def two_spirals(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points per class on two interleaved spirals, with a little noise."""
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0.05, 1.0, size=n)) * 3 * np.pi
    arm = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / (3 * np.pi)
    x = np.concatenate([arm, -arm]) + rng.normal(scale=0.02, size=(2 * n, 2))
    y = np.concatenate([np.zeros(n, np.int32), np.ones(n, np.int32)])
    order = rng.permutation(2 * n)
    return x[order].astype(np.float32), y[order]


class Classifier(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.features = [
            nnx.Linear(2, width, rngs=rngs),
            nnx.Linear(width, width, rngs=rngs),
            nnx.Linear(width, width, rngs=rngs),
        ]
        self.norms = [nnx.BatchNorm(width, rngs=rngs) for _ in self.features]
        self.dropout = nnx.Dropout(0.05, rngs=rngs)
        self.head = nnx.Linear(width, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for linear, norm in zip(self.features, self.norms):
            x = self.dropout(nnx.gelu(norm(linear(x))))
        return self.head(x)


@nnx.jit
def train_step(model: Classifier, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    def loss_fn(model: Classifier) -> tuple[jax.Array, jax.Array]:
        logits = model(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)  # in place, like the BatchNorm stats and Dropout keys
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def main() -> None:
    x_train, y_train = two_spirals(1024, seed=0)
    x_test, y_test = two_spirals(512, seed=1)
    model = Classifier(64, rngs=nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"Classifier with {n_params} parameters; training on {len(x_train)} points")

    batch, start = 128, time.perf_counter()
    for epoch in range(1, 31):
        perm = np.random.default_rng(epoch).permutation(len(x_train))
        losses, accs = [], []
        for i in range(0, len(x_train), batch):
            idx = perm[i : i + batch]
            loss, acc = train_step(model, optimizer, x_train[idx], y_train[idx])
            losses.append(loss)
            accs.append(acc)
        if epoch % 5 == 0:
            print(
                f"epoch {epoch:2d}  loss {float(np.mean(losses)):.4f}  "
                f"train accuracy {float(np.mean(accs)):.3f}  step {int(optimizer.step.value)}"
            )
    print(f"trained in {time.perf_counter() - start:.1f} s")

    # Inference: eval mode uses the BatchNorm running statistics and disables Dropout.
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def predict(state: nnx.State, x: jax.Array) -> jax.Array:
        return jnp.argmax(nnx.merge(graphdef, state)(x), -1)

    accuracy = float(jnp.mean(predict(state, x_test) == y_test))
    print(f"test accuracy {accuracy:.3f}")
    if accuracy < 0.9:
        raise SystemExit("demo: the classifier did not learn the spirals (accuracy < 0.9)")


if __name__ == "__main__":
    main()
