"""refax demo: build models, split them into GraphDef + State, transform, merge them back.

Run with ``make demo``. A later version trains a real model end to end; this one walks through
the object model: Modules holding Variables, shared references, split/merge/update, filters.
"""

import jax
import jax.numpy as jnp

from refax import nnx


class Linear(nnx.Module):
    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
        self.w = nnx.Param(rngs.params.uniform((din, dout)))
        self.b = nnx.Param(jnp.zeros((dout,)))
        self.din, self.dout = din, dout

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.w + self.b[None]


class Count(nnx.Variable):
    pass


class MLP(nnx.Module):
    def __init__(self, din: int, dmid: int, dout: int, *, rngs: nnx.Rngs):
        self.layers = [Linear(din, dmid, rngs=rngs), Linear(dmid, dout, rngs=rngs)]
        self.calls = Count(jnp.array(0, dtype=jnp.uint32))

    def __call__(self, x: jax.Array) -> jax.Array:
        self.calls += 1
        return self.layers[1](jax.nn.gelu(self.layers[0](x)))


def main() -> None:
    model = Linear(2, 5, rngs=nnx.Rngs(params=0))
    print("Linear(2, 5) on ones:", model(jnp.ones((1, 2))))

    mlp = MLP(2, 16, 3, rngs=nnx.Rngs(0))
    mlp.head = mlp.layers[1]  # a shared reference: one module, two paths
    print(mlp)

    # split -> pure pytrees -> jax.jit -> merge/update: state changes come back out.
    graphdef, params, counts = nnx.split(mlp, nnx.Param, Count)
    print("params:", [".".join(map(str, p)) for p in params.flat_state().paths])

    @jax.jit
    def forward(graphdef, params, counts, x):
        model = nnx.merge(graphdef, params, counts)
        y = model(x)
        return y, nnx.state(model, Count)

    x = jnp.ones((4, 2))
    for _ in range(3):
        y, counts = forward(graphdef, params, counts, x)
    nnx.update(mlp, counts)
    print("output shape:", y.shape, "calls after 3 jitted steps:", int(mlp.calls.value))

    clone = nnx.clone(mlp)
    print("sharing survives clone:", clone.head is clone.layers[1])

    # A gradient step over the Params only, written functionally.
    # jax.grad does not re-create non-differentiated arguments, and Variables made outside a
    # JAX transform cannot be mutated inside it (the forward pass increments `calls`), so the
    # model is merged with copy=True: fresh Variables that belong to this trace.
    def loss(params):
        model = nnx.merge(graphdef, params, counts, copy=True)
        return jnp.mean(model(x) ** 2)

    for step in range(5):
        value, grads = jax.value_and_grad(loss)(params)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        print(f"step {step}: loss {float(value):.5f}")
    nnx.update(mlp, params)


if __name__ == "__main__":
    main()
