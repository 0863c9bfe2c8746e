"""nnx.Optimizer / ModelAndOptimizer / OptState: the basics.md train step, optax parity with the
oracle flax.nnx, wrt filters, metadata, split/merge, optax extra args, errors, and the memory of
a jitted train step against the same step in pure JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx as F

from refax import nnx
from tests._oracle import assert_trees_close, pure

X = jax.random.normal(jax.random.key(1), (6, 3))
Y = jax.random.normal(jax.random.key(2), (6, 2))


def mse(m, x=X, y=Y):
    return jnp.mean((m(x) - y) ** 2)


def make_net(lib):
    class Net(lib.Module):
        def __init__(self, rngs):
            self.l1 = lib.Linear(3, 8, rngs=rngs)
            self.drop = lib.Dropout(0.3, rngs=rngs)
            self.bn = lib.BatchNorm(8, rngs=rngs)
            self.l2 = lib.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(lib.relu(self.drop(self.bn(self.l1(x)))))

    return Net(lib.Rngs(0, dropout=1))


def train(lib, tx, steps=3, jit=True, model=None):
    model = make_net(lib) if model is None else model
    opt = lib.Optimizer(model, tx, wrt=lib.Param)

    def step(model, opt):
        loss, grads = lib.value_and_grad(mse)(model)
        opt.update(model, grads)
        return loss

    step = lib.jit(step) if jit else step
    losses = [float(step(model, opt)) for _ in range(steps)]
    return losses, pure(lib, model), pure(lib, opt), opt


# -- basics.md ----------------------------------------------------------------------------
class Linear(nnx.Module):
    def __init__(self, din, dout, *, rngs):
        self.w = nnx.Param(rngs.params.uniform((din, dout)))
        self.b = nnx.Param(jnp.zeros((dout,)))
        self.din, self.dout = din, dout

    def __call__(self, x):
        return x @ self.w + self.b[None]


class MLP(nnx.Module):
    def __init__(self, din, dmid, dout, *, rngs):
        self.linear1 = Linear(din, dmid, rngs=rngs)
        self.dropout = nnx.Dropout(rate=0.1)
        self.bn = nnx.BatchNorm(dmid, rngs=rngs)
        self.linear2 = Linear(dmid, dout, rngs=rngs)

    def __call__(self, x, rngs):
        x = nnx.gelu(self.dropout(self.bn(self.linear1(x)), rngs=rngs))
        return self.linear2(x)


class LoraParam(nnx.Param):
    pass


class LoraLinear(nnx.Module):
    def __init__(self, linear, rank, rngs):
        self.linear = linear
        self.A = LoraParam(rngs.normal((linear.din, rank)))
        self.B = LoraParam(rngs.normal((rank, linear.dout)))

    def __call__(self, x):
        return self.linear(x) + x @ self.A @ self.B


def test_basics_train_step_prints_recorded_output():
    # the `rngs` the document's train_step cell uses, after the model-surgery cell consumed it
    rngs = nnx.Rngs(0)
    surgery = MLP(2, 32, 5, rngs=rngs)
    surgery.linear1 = LoraLinear(surgery.linear1, 4, rngs=rngs)
    surgery.linear2 = LoraLinear(surgery.linear2, 4, rngs=rngs)
    surgery(x=jnp.ones((3, 2)), rngs=rngs)

    model = MLP(2, 16, 10, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y, rngs):
        def loss_fn(model, rngs):
            y_pred = model(x, rngs)
            return jnp.mean((y_pred - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model, rngs)
        optimizer.update(model, grads)
        return loss

    x, y = jnp.ones((5, 2)), jnp.ones((5, 10))
    loss = train_step(model, optimizer, x, y, rngs)
    assert f"{loss = }" == "loss = Array(1.0000616, dtype=float32)"
    assert f"{optimizer.step.value = }" == "optimizer.step.value = Array(1, dtype=uint32)"


# -- optax parity -------------------------------------------------------------------------
TXS = {
    "momentum": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw-chain": lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2)),
}


@pytest.mark.parametrize("name", list(TXS))
def test_optax_numbers_match_oracle(name):
    l_r, m_r, o_r, opt = train(nnx, TXS[name]())
    l_f, m_f, o_f, _ = train(F, TXS[name]())
    np.testing.assert_allclose(l_r, l_f, rtol=1e-6)
    assert_trees_close(m_r, m_f, rtol=1e-5)
    assert_trees_close(o_r, o_f, rtol=1e-5)
    assert opt.step.value.dtype == jnp.uint32 and int(opt.step.value) == 3
    assert l_r[-1] < l_r[0]


def test_eager_and_jit_agree():
    # (adam would amplify float rounding differences in near-zero gradients; so does flax)
    l_j, m_j, o_j, _ = train(nnx, optax.sgd(0.1, momentum=0.9), jit=True)
    l_e, m_e, o_e, _ = train(nnx, optax.sgd(0.1, momentum=0.9), jit=False)
    np.testing.assert_allclose(l_j, l_e, rtol=1e-5)
    assert_trees_close(m_j, m_e, rtol=1e-5, atol=1e-6)
    assert_trees_close(o_j, o_e, rtol=1e-5, atol=1e-6)


def test_update_returns_optax_updates():
    m = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    before = pure(nnx, nnx.state(m, nnx.Param))
    opt = nnx.Optimizer(m, optax.sgd(0.5), wrt=nnx.Param)
    grads = nnx.grad(mse)(m)
    updates = opt.update(m, grads)
    after = pure(nnx, nnx.state(m, nnx.Param))
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(after[k] - before[k], updates[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(updates[k], -0.5 * grads[k].value, rtol=1e-6)


def test_optimizer_created_inside_jit():
    tx = optax.adam(1e-2)

    @nnx.jit
    def create():
        model = make_net(nnx)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, opt = create()
    assert isinstance(opt.opt_state[0].mu["l1"]["kernel"], nnx.OptVariable)
    assert int(opt.step.value) == 0 and not isinstance(opt.step.value, jax.core.Tracer)
    l_r, m_r, o_r, _ = train(nnx, tx, model=model)
    assert_trees_close(m_r, train(F, optax.adam(1e-2))[1], rtol=1e-5)


# -- wrt filters --------------------------------------------------------------------------
def lora_model(lib):
    return lib.LoRALinear(3, 2, lora_rank=2, rngs=lib.Rngs(0), b_initializer=lib.initializers.ones)


def test_wrt_lora_updates_only_lora_params():
    results = {}
    for lib in (nnx, F):
        m = lora_model(lib)
        frozen = pure(lib, lib.state(m, lib.Not(lib.LoRAParam)))
        opt = lib.Optimizer(m, optax.adam(0.1), wrt=lib.LoRAParam)
        assert set(pure(lib, opt)["opt_state"][0]["mu"]) == {"lora"}
        for _ in range(2):
            g = lib.grad(lambda m: jnp.sum(m(X) ** 2), argnums=lib.DiffState(0, lib.LoRAParam))(m)
            opt.update(m, g)
        assert_trees_close(pure(lib, lib.state(m, lib.Not(lib.LoRAParam))), frozen)
        results[lib] = pure(lib, m), pure(lib, opt)
    assert_trees_close(results[nnx][0], results[F][0], rtol=1e-5)
    assert_trees_close(results[nnx][1], results[F][1], rtol=1e-5)
    assert not np.allclose(results[nnx][0]["lora"]["lora_b"], 1.0)


def test_update_filters_grads_by_wrt():
    m = lora_model(nnx)
    kernel = m.kernel.value
    opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.LoRAParam)
    opt.update(m, nnx.grad(lambda m: jnp.sum(m(X) ** 2))(m))  # grads of every Param
    np.testing.assert_array_equal(m.kernel.value, kernel)
    assert int(opt.step.value) == 1


# -- ModelAndOptimizer --------------------------------------------------------------------
def model_and_optimizer_steps(lib):
    model = make_net(lib)
    opt = lib.ModelAndOptimizer(model, optax.adam(1e-2))
    assert opt.model is model

    @lib.jit
    def step(opt):
        loss, grads = lib.value_and_grad(mse)(opt.model)
        opt.update(grads)
        return loss

    losses = [float(step(opt)) for _ in range(2)]
    loss, grads = lib.value_and_grad(mse)(model)  # and eagerly
    opt.update(grads)
    assert opt.model is model and int(opt.step[...]) == 3
    return losses, pure(lib, model), pure(lib, opt)


def test_model_and_optimizer():
    (l_r, m_r, o_r), (l_f, m_f, o_f) = map(model_and_optimizer_steps, (nnx, F))
    np.testing.assert_allclose(l_r, l_f, rtol=1e-6)
    assert_trees_close(m_r, m_f, rtol=1e-5)
    assert_trees_close(o_r, o_f, rtol=1e-5)


# -- OptState Variables -------------------------------------------------------------------
def test_opt_variable_carries_param_metadata():
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((4, 8)), sharding_names=("a", "b"))
            self.c = nnx.Param(jnp.ones((2,)))

    with jax.set_mesh(jax.make_mesh((1, 1), ("a", "b"))):
        m = M()
        opt = nnx.Optimizer(m, optax.adam(0.1), wrt=nnx.Param)
    adam = opt.opt_state[0]
    for sub in (adam.mu, adam.nu):
        assert type(sub["w"]) is nnx.OptVariable and type(sub["c"]) is nnx.OptVariable
        assert sub["w"].sharding_names == ("a", "b") == m.w.sharding_names
        assert sub["w"].get_metadata() == m.w.get_metadata()
        assert sub["c"].get_metadata() == m.c.get_metadata()
    assert type(adam.count) is nnx.OptArray and type(opt.step) is nnx.OptState
    assert issubclass(nnx.OptArray, nnx.OptState) and issubclass(nnx.OptVariable, nnx.OptState)
    assert issubclass(nnx.OptState, nnx.Variable)
    assert set(nnx.state(opt, nnx.OptArray)["opt_state"][0]) == {"count"}
    assert set(nnx.state(opt, nnx.OptVariable)["opt_state"][0]) == {"mu", "nu"}


def test_opt_state_split_merge_and_functional_step():
    model = make_net(nnx)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    graphdef, state = nnx.split(opt)
    opt2 = nnx.merge(graphdef, state)
    assert type(opt2) is nnx.Optimizer and opt2.wrt is nnx.Param
    assert opt2.opt_state[0].mu["l1"]["kernel"] is opt.opt_state[0].mu["l1"]["kernel"]
    gd, params, opt_vars, rest = nnx.split((model, opt), nnx.Param, nnx.OptState, ...)
    assert set(opt_vars[1]) == {"opt_state", "step"} and set(params) == {0}

    @jax.jit
    def fstep(params, opt_vars, rest):
        model, opt = nnx.merge(gd, params, opt_vars, rest)
        loss, grads = nnx.value_and_grad(mse)(model)
        opt.update(model, grads)
        return loss, nnx.split((model, opt), nnx.Param, nnx.OptState, ...)[1:]

    losses = []
    for _ in range(3):
        loss, (params, opt_vars, rest) = fstep(params, opt_vars, rest)
        losses.append(float(loss))
    ref_losses, ref_model, ref_opt, _ = train(nnx, optax.adam(1e-2))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    merged_model, merged_opt = nnx.merge(gd, params, opt_vars, rest)
    assert_trees_close(pure(nnx, merged_model), ref_model, rtol=1e-5, atol=1e-6)
    assert_trees_close(pure(nnx, merged_opt), ref_opt, rtol=1e-5, atol=1e-6)


def test_update_optimizer_in_place_from_state():
    opt = nnx.Optimizer(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), optax.adam(0.1), wrt=nnx.Param)
    nnx.update(opt, jax.tree.map(lambda x: x + 1, nnx.state(opt)))
    assert int(opt.step.value) == 1 and int(opt.opt_state[0].count.value) == 1


# -- optax extra arguments ----------------------------------------------------------------
def test_kwargs_forwarded_to_optax():
    results = {}
    for lib in (nnx, F):
        m = lib.Linear(3, 2, rngs=lib.Rngs(0))
        plateau = optax.contrib.reduce_on_plateau(patience=0, factor=0.5, accumulation_size=1)
        opt = lib.Optimizer(m, optax.chain(optax.sgd(0.3), plateau), wrt=lib.Param)
        losses = []
        for _ in range(4):
            loss, grads = lib.value_and_grad(mse)(m)
            opt.update(m, grads, value=loss)  # reduce_on_plateau needs `value`
            losses.append(float(loss))
        results[lib] = losses, pure(lib, m), pure(lib, opt)
        with pytest.raises(TypeError):
            opt.update(m, grads)  # missing `value`
    np.testing.assert_allclose(results[nnx][0], results[F][0], rtol=1e-6)
    assert_trees_close(results[nnx][1], results[F][1], rtol=1e-5)
    assert_trees_close(results[nnx][2], results[F][2], rtol=1e-5)


def test_lbfgs_with_grad_value_and_value_fn():
    m = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(m, optax.lbfgs(), wrt=nnx.Param)
    graphdef, _, rest = nnx.split(m, nnx.Param, ...)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(mse)(m)
        value_fn = lambda params: mse(nnx.merge(graphdef, params, rest))
        opt.update(m, grads, grad=grads, value=loss, value_fn=value_fn)
        return loss

    losses = [float(step(m, opt)) for _ in range(3)]
    assert losses[0] > losses[1] > losses[2] and losses[-1] < 0.5 * losses[0]


# -- errors -------------------------------------------------------------------------------
def test_wrt_is_required():
    with pytest.raises(TypeError, match="wrt"):
        nnx.Optimizer(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), optax.sgd(0.1))


def mismatched_update(tx, other):
    m = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(m, tx, wrt=nnx.Param)
    with pytest.raises(ValueError, match="gradients do not match") as e:
        opt.update(m, nnx.state(other, nnx.Param))
    assert int(opt.step.value) == 0
    np.testing.assert_array_equal(m.kernel.value, nnx.Linear(3, 2, rngs=nnx.Rngs(0)).kernel.value)
    return e


def test_mismatched_grads_structure_clear_error_adam():
    mismatched_update(optax.adam(0.1), nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0)))


def test_mismatched_grads_structure_clear_error_sgd():
    mismatched_update(optax.sgd(0.1), nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0)))


def test_mismatched_grads_shape_clear_error():
    mismatched_update(optax.adam(0.1), nnx.Linear(3, 5, rngs=nnx.Rngs(0)))


# -- memory -------------------------------------------------------------------------------
def test_jit_train_step_temp_memory_matches_pure_jax():
    d, layers, batch = 512, 4, 1024

    class Deep(nnx.Module):
        def __init__(self, rngs):
            self.layers = [nnx.Linear(d, d, rngs=rngs) for _ in range(layers)]

        def __call__(self, x):
            for layer in self.layers:
                x = nnx.relu(layer(x))
            return x

    model, tx = Deep(nnx.Rngs(0)), optax.adam(1e-3)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = jnp.ones((batch, d)), jnp.zeros((batch, d))

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    def forward(p, x):
        for layer in p:
            x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
        return x

    @jax.jit
    def jax_step(p, s, x, y):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((forward(p, x) - y) ** 2))(p)
        updates, s = tx.update(g, s, p)
        return loss, optax.apply_updates(p, updates), s

    params = [{"kernel": lay.kernel.value, "bias": lay.bias.value} for lay in model.layers]
    refax_mem = step.lower(model, opt, x, y).compile().memory_analysis()
    jax_mem = jax_step.lower(params, tx.init(params), x, y).compile().memory_analysis()
    assert jax_mem.temp_size_in_bytes > 4 * batch * d  # the activations are really there
    ratio = refax_mem.temp_size_in_bytes / jax_mem.temp_size_in_bytes
    assert ratio <= 1.05, f"temp memory ratio refax/jax = {ratio:.3f}"
    total = lambda s: s.argument_size_in_bytes + s.output_size_in_bytes + s.temp_size_in_bytes
    assert total(refax_mem) <= 1.05 * total(jax_mem)
