"""Recurrent cells, RNN and Bidirectional: oracle parity, reference math, gradients, errors."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F

from refax import nnx
from refax._rngs import Rngs
from refax.nn import Dropout, initializers
from refax.nn import recurrent as rec

CELLS = ["LSTMCell", "OptimizedLSTMCell", "GRUCell", "SimpleCell"]
X = jax.random.normal(jax.random.key(7), (2, 5, 3))
LENGTHS = jnp.array([5, 2])


def raw(v):
    v = v.get_value() if hasattr(v, "get_value") else v
    if jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
        v = jax.random.key_data(v)
    return np.asarray(v, np.float32)


def flat_state(lib, module):
    return {tuple(map(str, p)): raw(v) for p, v in lib.to_flat_state(lib.state(module))}


def assert_same_state(ref, mine):
    a, b = flat_state(F, ref), flat_state(nnx, mine)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=str(k))


def assert_close(ref, mine, rtol=1e-5):
    assert jax.tree.structure(ref) == jax.tree.structure(mine)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(mine)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(raw(a), raw(b), rtol=rtol, atol=1e-6)


def pair(name, *args, **kw):
    return getattr(F, name)(*args, **kw, rngs=F.Rngs(0)), getattr(rec, name)(
        *args, **kw, rngs=Rngs(0)
    )


# -- signatures and parameters ----------------------------------------------------------------
@pytest.mark.parametrize("name", [*CELLS, "RNN", "Bidirectional"])
def test_signature_matches_oracle(name):
    ref = inspect.signature(getattr(F, name).__init__).parameters
    mine = inspect.signature(getattr(rec, name).__init__).parameters
    assert list(ref) == list(mine)
    for p in ref:
        assert ref[p].kind == mine[p].kind, p
        d_ref, d_mine = ref[p].default, mine[p].default
        if isinstance(d_ref, (bool, int, type(None))):
            assert d_ref == d_mine, p
    ref_call = inspect.signature(getattr(F, name).__call__).parameters
    assert list(ref_call) == list(inspect.signature(getattr(rec, name).__call__).parameters)


@pytest.mark.parametrize(
    "name,param_dtype",
    [(n, jnp.float32) for n in CELLS] + [(n, jnp.bfloat16) for n in ("LSTMCell", "GRUCell")],
)
def test_cell_params_and_step_match_oracle(name, param_dtype):
    kw = dict(param_dtype=param_dtype)
    if param_dtype == jnp.bfloat16 and name != "LSTMCell":  # QR has no bfloat16 kernel
        kw["recurrent_kernel_init"] = rec.modified_orthogonal
    ref, mine = pair(name, 3, 4, **kw)
    assert_same_state(ref, mine)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(mine))} == {jnp.dtype(param_dtype)}
    init = initializers.normal(1.0)
    c_ref = ref.initialize_carry((2, 3), F.Rngs(carry=1), carry_init=init)
    c_mine = mine.initialize_carry((2, 3), Rngs(carry=1), carry_init=init)
    assert_close(c_ref, c_mine)
    assert_close(
        ref(c_ref, X[:, 0]),
        mine(c_mine, X[:, 0]),
        rtol=1e-2 if param_dtype == jnp.bfloat16 else 1e-5,
    )


def test_cell_options_match_oracle():
    kw = dict(
        kernel_init=initializers.normal(0.5),
        recurrent_kernel_init=initializers.lecun_normal(),
        bias_init=initializers.normal(0.1),
        gate_fn=jax.nn.hard_sigmoid,
        activation_fn=jax.nn.relu,
    )
    for name in ("LSTMCell", "GRUCell"):
        ref, mine = pair(name, 3, 4, **kw)
        assert_same_state(ref, mine)
        carry = (jnp.ones((2, 4)),) * 2 if "LSTM" in name else jnp.ones((2, 4))
        assert_close(ref(carry, X[:, 0]), mine(carry, X[:, 0]))
    ref, mine = pair("SimpleCell", 3, 4, residual=True, bias_init=initializers.normal(0.1))
    assert_close(ref(jnp.ones((2, 4)), X[:, 0]), mine(jnp.ones((2, 4)), X[:, 0]))
    ref, mine = pair("OptimizedLSTMCell", 3, 4, dtype=jnp.bfloat16)
    carry = (jnp.ones((2, 4)), jnp.ones((2, 4)))
    assert_close(ref(carry, X[:, 0]), mine(carry, X[:, 0]), rtol=1e-2)


def test_parameter_paths():
    cell = rec.LSTMCell(2, 3, rngs=Rngs(0))
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(cell))}
    expected = {(g, "kernel") for g in ("ii", "if_", "ig", "io", "hi", "hf", "hg", "ho")}
    assert paths == expected | {(g, "bias") for g in ("hi", "hf", "hg", "ho")}
    assert cell.num_feature_axes == 1


def test_modified_orthogonal_matches_oracle():
    key = jax.random.key(3)
    for dtype in (jnp.float32, jnp.bfloat16):
        ref = F.nn.recurrent.modified_orthogonal(key, (4, 4), dtype)
        mine = rec.modified_orthogonal(key, (4, 4), dtype)
        assert mine.dtype == dtype
        np.testing.assert_array_equal(raw(ref), raw(mine))


# -- reference math -------------------------------------------------------------------------
def k(layer):
    return layer.kernel[...]


def test_lstm_step_matches_numpy_reference():
    cell = rec.LSTMCell(3, 4, bias_init=initializers.normal(0.5), rngs=Rngs(0))
    x, c, h = X[:, 0], jnp.full((2, 4), 0.3), jnp.full((2, 4), -0.2)
    (new_c, new_h), y = cell((c, h), x)

    def gate(i_layer, h_layer, act):
        return act(x @ k(i_layer) + h @ k(h_layer) + h_layer.bias[...])

    i = gate(cell.ii, cell.hi, jax.nn.sigmoid)
    f = gate(cell.if_, cell.hf, jax.nn.sigmoid)
    g = gate(cell.ig, cell.hg, jnp.tanh)
    o = gate(cell.io, cell.ho, jax.nn.sigmoid)
    ref_c = f * c + i * g
    np.testing.assert_allclose(new_c, ref_c, rtol=1e-5)
    np.testing.assert_allclose(new_h, o * jnp.tanh(ref_c), rtol=1e-5)
    np.testing.assert_array_equal(y, new_h)


def test_gru_step_matches_numpy_reference():
    cell = rec.GRUCell(3, 4, bias_init=initializers.normal(0.5), rngs=Rngs(0))
    x, h = X[:, 0], jnp.full((2, 4), 0.4)
    new_h, y = cell(h, x)
    wi, bi, wh = k(cell.dense_i), cell.dense_i.bias[...], k(cell.dense_h)
    xs = np.split(x @ wi + bi, 3, axis=-1)
    hs = np.split(h @ wh, 3, axis=-1)
    r = jax.nn.sigmoid(xs[0] + hs[0])
    z = jax.nn.sigmoid(xs[1] + hs[1])
    n = jnp.tanh(xs[2] + r * hs[2])
    np.testing.assert_allclose(new_h, (1 - z) * n + z * h, rtol=1e-5)
    np.testing.assert_array_equal(y, new_h)


def test_optimized_lstm_equals_lstm_with_same_weights():
    lstm = rec.LSTMCell(3, 4, bias_init=initializers.normal(0.5), rngs=Rngs(0))
    opt = rec.OptimizedLSTMCell(3, 4, rngs=Rngs(1))
    opt.dense_i.kernel[...] = jnp.concatenate([k(lstm.ii), k(lstm.if_), k(lstm.ig), k(lstm.io)], 1)
    opt.dense_h.kernel[...] = jnp.concatenate([k(lstm.hi), k(lstm.hf), k(lstm.hg), k(lstm.ho)], 1)
    opt.dense_h.bias[...] = jnp.concatenate(
        [g.bias[...] for g in (lstm.hi, lstm.hf, lstm.hg, lstm.ho)]
    )
    carry = (jnp.full((2, 4), 0.1), jnp.full((2, 4), 0.2))
    assert_close(lstm(carry, X[:, 0]), opt(carry, X[:, 0]))


# -- RNN ------------------------------------------------------------------------------------
RNN_CASES = [
    ("LSTMCell", {}, {}),
    ("OptimizedLSTMCell", {"reverse": True}, {}),
    ("GRUCell", {"reverse": True, "keep_order": True}, {"seq_lengths": LENGTHS}),
    ("SimpleCell", {"return_carry": True}, {"seq_lengths": LENGTHS}),
    ("LSTMCell", {"return_carry": True, "reverse": True}, {"seq_lengths": LENGTHS}),
    ("GRUCell", {"time_major": True, "unroll": 2}, {"return_carry": True}),
]


@pytest.mark.parametrize("name,init_kw,call_kw", RNN_CASES)
def test_rnn_matches_oracle(name, init_kw, call_kw):
    ref_cell, cell = pair(name, 3, 4)
    ref, mine = F.RNN(ref_cell, **init_kw), rec.RNN(cell, **init_kw)
    x = jnp.swapaxes(X, 0, 1) if init_kw.get("time_major") else X
    assert_close(ref(x, **call_kw), mine(x, **call_kw))
    assert_same_state(ref, mine)  # parameters and the carry stream's count


def test_rnn_call_rngs_and_initial_carry_match_oracle():
    ref_cell, cell = pair("LSTMCell", 3, 4, carry_init=None)
    ref, mine = F.RNN(ref_cell, rngs=F.Rngs(carry=3)), rec.RNN(cell, rngs=Rngs(carry=3))
    carry = (jnp.full((2, 4), 0.5), jnp.full((2, 4), -0.5))
    assert_close(ref(X, initial_carry=carry), mine(X, initial_carry=carry))
    init = initializers.normal(1.0)
    ref_c = ref_cell.initialize_carry((2, 3), F.Rngs(carry=9), carry_init=init)
    mine_c = cell.initialize_carry((2, 3), Rngs(carry=9), carry_init=init)
    assert_close(ref(X, initial_carry=ref_c), mine(X, initial_carry=mine_c))
    assert_close(ref(X, rngs=F.Rngs(carry=1)), mine(X, rngs=Rngs(carry=1)))
    assert_same_state(ref, mine)


def test_rnn_seq_lengths_carry_is_last_valid_step():
    rnn = rec.RNN(rec.GRUCell(3, 4, rngs=Rngs(0)), return_carry=True)
    carry, y = rnn(X, seq_lengths=LENGTHS)
    np.testing.assert_allclose(carry[0], y[0, 4])
    np.testing.assert_allclose(carry[1], y[1, 1])
    # Outputs are unaffected by seq_lengths (as in the reference), the carry freezes.
    np.testing.assert_allclose(y, rnn(X, return_carry=False))
    rev_carry, rev_y = rnn(X, seq_lengths=LENGTHS, reverse=True, keep_order=True)
    np.testing.assert_allclose(rev_carry[1], rev_y[1, 0], rtol=1e-6)
    init = jnp.full((2, 4), 0.5)  # a length of 0 gives back the initial carry
    carry, _ = rnn(X, initial_carry=init, seq_lengths=jnp.array([0, 3]))
    np.testing.assert_array_equal(carry[0], init[0])


def test_bidirectional_matches_oracle():
    rf1, mf = pair("LSTMCell", 3, 4)
    rb1 = F.GRUCell(3, 4, rngs=F.Rngs(1))
    mb = rec.GRUCell(3, 4, rngs=Rngs(1))
    ref = F.Bidirectional(F.RNN(rf1), F.RNN(rb1), return_carry=True)
    mine = rec.Bidirectional(rec.RNN(mf), rec.RNN(mb), return_carry=True)
    assert_close(ref(X, seq_lengths=LENGTHS), mine(X, seq_lengths=LENGTHS))
    assert_close(ref(X, rngs=F.Rngs(carry=2)), mine(X, rngs=Rngs(carry=2)))
    assert_same_state(ref, mine)
    out = mine(jnp.swapaxes(X, 0, 1), time_major=True, return_carry=False)
    assert out.shape == (5, 2, 8)


def test_flip_sequences_matches_oracle():
    x = jnp.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)
    lengths = jnp.array([[4, 1, 3], [2, 4, 0]])
    for time_major, xs in ((False, x), (True, jnp.moveaxis(x, 2, 0))):
        for sl in (None, lengths):
            ref = F.nn.recurrent.flip_sequences(xs, sl, 2, time_major)
            mine = rec.flip_sequences(xs, sl, 2, time_major)
            np.testing.assert_array_equal(ref, mine)
            np.testing.assert_array_equal(rec.flip_sequences(mine, sl, 2, time_major), xs)


def loop_reference(cell, x, lengths):
    """Plain Python time loop; returns the carry after each sequence's last valid step."""
    carry = last = cell.initialize_carry(x[:, 0].shape, Rngs(0))
    ys = []
    for t in range(x.shape[1]):
        carry, y = cell(carry, x[:, t])
        keep = (t < lengths)[:, None]
        last = jax.tree.map(lambda n, o, m=keep: jnp.where(m, n, o), carry, last)
        ys.append(y)
    return last, jnp.stack(ys, 1)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell"])
def test_rnn_gradients_match_python_loop(name):
    cell = getattr(rec, name)(3, 4, bias_init=initializers.normal(0.3), rngs=Rngs(0))
    graphdef, params, rest = nnx.split(rec.RNN(cell, return_carry=True), nnx.Param, ...)

    def loss_rnn(params, x):
        carry, y = nnx.merge(graphdef, params, rest, copy=True)(x, seq_lengths=LENGTHS)
        return (y**2).sum() + sum((c**3).sum() for c in jax.tree.leaves(carry))

    def loss_loop(params, x):
        carry, y = loop_reference(nnx.merge(graphdef, params, rest, copy=True).cell, x, LENGTHS)
        return (y**2).sum() + sum((c**3).sum() for c in jax.tree.leaves(carry))

    v_rnn, g_rnn = jax.jit(jax.value_and_grad(loss_rnn, argnums=(0, 1)))(params, X)
    v_loop, g_loop = jax.jit(jax.value_and_grad(loss_loop, argnums=(0, 1)))(params, X)
    np.testing.assert_allclose(v_rnn, v_loop, rtol=1e-5)
    assert jax.tree.structure(g_rnn) == jax.tree.structure(g_loop)
    for a, b in zip(jax.tree.leaves(g_rnn), jax.tree.leaves(g_loop)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# -- state handling -------------------------------------------------------------------------
def counting_cell(lib, base, dropout_cls):
    class Counting(base):
        def __init__(self):
            self.calls = lib.Variable(jnp.array(0))
            self.drop = dropout_cls(0.5, rngs=lib.Rngs(dropout=1))

        def __call__(self, carry, x):
            self.calls[...] += 1
            y = self.drop(x)
            return carry + y.sum(-1), y

        def initialize_carry(self, input_shape, rngs=None):
            return jnp.zeros(input_shape[:-1])

        @property
        def num_feature_axes(self):
            return 1

    return Counting()


@pytest.mark.parametrize("broadcast_rngs", [None, "dropout"])
def test_rnn_variable_updates_and_broadcast_rngs_match_oracle(broadcast_rngs):
    ref = F.RNN(
        counting_cell(F, F.RNNCellBase, F.Dropout), broadcast_rngs=broadcast_rngs, return_carry=True
    )
    mine = rec.RNN(
        counting_cell(nnx, rec.RNNCellBase, Dropout),
        broadcast_rngs=broadcast_rngs,
        return_carry=True,
    )
    x = jnp.ones((2, 3, 4))
    for _ in range(2):
        assert_close(ref(x), mine(x))
    assert int(mine.cell.calls[...]) == 6
    assert_same_state(ref, mine)
    if broadcast_rngs:  # the same mask at every step
        _, y = mine(x)
        np.testing.assert_array_equal(y[:, 0], y[:, 2])


def test_rnn_state_axes_scans_variables():
    class PerStep(rec.RNNCellBase):
        def __init__(self):
            self.w = nnx.Param(jnp.arange(3.0)[:, None] * jnp.ones((3, 2)))
            self.seen = nnx.BatchStat(jnp.zeros(2))

        def __call__(self, carry, x):
            self.seen[...] += 1
            self.w[...] += 10  # scanned Variables are written back slice by slice
            return carry + self.w[...] * x, self.w[...] * x

        def initialize_carry(self, input_shape, rngs=None):
            return jnp.zeros(input_shape)

        @property
        def num_feature_axes(self):
            return 1

    rnn = rec.RNN(PerStep(), state_axes={nnx.Param: 0, ...: "carry"}, time_major=True)
    y = rnn(jnp.ones((3, 2)))
    np.testing.assert_allclose(y, [[10, 10], [11, 11], [12, 12]])
    np.testing.assert_allclose(rnn.cell.seen[...], [3, 3])
    np.testing.assert_allclose(rnn.cell.w[...][:, 0], [10, 11, 12])


def test_rnn_broadcast_state_sees_initial_values_and_drops_updates():
    class Counting(rec.RNNCellBase):
        def __init__(self):
            self.seen = nnx.BatchStat(jnp.zeros(()))

        def __call__(self, carry, x):
            self.seen[...] += 1  # broadcast: every step reads 0 and the update is dropped
            return carry + self.seen[...] * x, self.seen[...] * x

        def initialize_carry(self, input_shape, rngs=None):
            return jnp.zeros(input_shape)

        @property
        def num_feature_axes(self):
            return 1

    broadcast = rec.RNN(Counting(), state_axes={nnx.BatchStat: None}, time_major=True)
    np.testing.assert_allclose(broadcast(jnp.ones((4, 2)))[:, 0], [1, 1, 1, 1])
    np.testing.assert_allclose(broadcast.cell.seen[...], 0)
    carried = rec.RNN(Counting(), time_major=True)  # default: everything carried
    np.testing.assert_allclose(carried(jnp.ones((4, 2)))[:, 0], [1, 2, 3, 4])
    np.testing.assert_allclose(carried.cell.seen[...], 4)


def test_rnn_under_jit_matches_eager():
    rnn = rec.RNN(rec.OptimizedLSTMCell(3, 4, rngs=Rngs(0)), reverse=True)
    graphdef, state = nnx.split(rnn)

    @jax.jit
    def run(state, x):
        module = nnx.merge(graphdef, state, copy=True)
        y = module(x)
        return y, nnx.state(module)

    y, new_state = run(state, X)
    np.testing.assert_allclose(y, rnn(X), rtol=1e-6)
    np.testing.assert_array_equal(new_state["rngs"]["count"][...], rnn.rngs.count[...])


# -- errors and warnings ----------------------------------------------------------------------
@pytest.mark.parametrize("name", CELLS)
def test_cell_wrong_feature_size_errors(name):
    cell = getattr(rec, name)(3, 4, rngs=Rngs(0))
    carry = cell.initialize_carry((2, 3), Rngs(0))
    with pytest.raises(ValueError, match=rf"{name} expects inputs .*in_features=3.*\(2, 5\)"):
        cell(carry, jnp.ones((2, 5)))
    bad = jax.tree.map(lambda c: jnp.ones((2, 6)), carry)
    with pytest.raises(ValueError, match=rf"{name} expects a carry .*hidden_features=4.*\(2, 6\)"):
        cell(bad, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"RNN expects inputs with a time axis"):
        rec.RNN(cell)(jnp.ones((3,)))
    with pytest.raises(ValueError, match=rf"{name} expects inputs .*in_features=3"):
        rec.RNN(cell)(jnp.ones((2, 5, 7)))


def test_rnn_bad_arguments():
    cell = rec.GRUCell(3, 4, rngs=Rngs(0))
    with pytest.raises(ValueError, match=r"seq_lengths of the batch shape \(2,\)"):
        rec.RNN(cell)(X, seq_lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="initialize_carry needs RNGs"):
        rec.RNN(cell, rngs=False)(X)
    with pytest.raises(ValueError, match="rngs must be"):
        rec.RNN(cell, rngs="seed")
    with pytest.raises(TypeError, match="rngs must be"):
        rec.Bidirectional(rec.RNN(cell), rec.RNN(cell), rngs=3)
    with pytest.raises(NotImplementedError, match="initialize_carry"):
        rec.RNNCellBase().initialize_carry((1, 2))


def test_deprecated_arguments_warn():
    with pytest.warns(UserWarning, match="keep_rngs is deprecated"):
        cell = rec.SimpleCell(3, 4, keep_rngs=True, rngs=Rngs(0))
    assert cell.initialize_carry((2, 3)).shape == (2, 4)
    with pytest.warns(UserWarning, match="carry_init given to __init__"):
        cell = rec.LSTMCell(3, 4, carry_init=initializers.ones, rngs=Rngs(0))
    np.testing.assert_array_equal(cell.initialize_carry((3,), Rngs(0))[0], jnp.ones(4))
