"""view, with_attributes, view_info: shared state, train/eval flags, filters, errors, oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as F

from refax import nnx
from refax._view import view, view_info, with_attributes
from tests._oracle import assert_trees_close, pure


def make_block(lib):
    class Block(lib.Module):
        def __init__(self, rngs):
            self.linear = lib.Linear(2, 3, rngs=rngs)
            self.bn = lib.BatchNorm(3, rngs=rngs)
            self.dropout = lib.Dropout(0.5, rngs=rngs)
            self.attn = lib.MultiHeadAttention(1, 3, 3, decode=False, rngs=rngs)

        def __call__(self, x):
            return self.dropout(self.bn(self.linear(x)))

    return Block(lib.Rngs(0))


X = jax.random.normal(jax.random.key(0), (4, 2))
FLAGS = dict(deterministic=True, use_running_average=True)


def flags(model):
    return (
        model.dropout.deterministic,
        model.bn.use_running_average,
        model.attn.deterministic,
    )


# -- view -----------------------------------------------------------------------------------
def test_view_sets_flags_on_a_copy():
    model = make_block(nnx)
    before = flags(model)
    for kw in (FLAGS, dict(deterministic=False, use_running_average=False)):
        v = view(model, **kw)
        assert flags(v) == (kw["deterministic"], kw["use_running_average"], kw["deterministic"])
        assert flags(model) == before
        assert v is not model and v.bn is not model.bn and v.dropout.rngs is not model.dropout.rngs


def test_view_flags_match_oracle():
    for kw in (FLAGS, dict(deterministic=True), dict(use_running_average=True), {}):
        ref, mine = view(make_block(nnx), **kw), F.view(make_block(F), **kw)
        assert flags(ref) == flags(mine)


def test_view_shares_variables():
    model = make_block(nnx)
    train = view(model, deterministic=False, use_running_average=False)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(train))
    ):
        assert a is b, path
    # batch statistics and RNG counters updated through the view are the original's
    count = int(model.dropout.rngs.count[...])
    train(X)
    assert int(model.dropout.rngs.count[...]) == count + 1
    assert not np.allclose(model.bn.mean[...], 0.0)
    # and writes to the original are seen by the view
    model.linear.kernel[...] = jnp.zeros((2, 3))
    assert (train.linear.kernel[...] == 0).all()


def test_eval_view_is_deterministic_and_freezes_stats():
    model = make_block(nnx)
    ev = view(model, **FLAGS)
    mean = model.bn.mean[...]
    y1, y2 = ev(X), ev(X)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(model.bn.mean[...], mean)
    expected = model.bn(model.linear(X), use_running_average=True)
    np.testing.assert_allclose(y1, expected, rtol=1e-6)


def test_view_output_matches_oracle():
    ref, mine = make_block(F), make_block(nnx)
    for kw in (dict(deterministic=False, use_running_average=False), FLAGS):
        y_ref, y = F.view(ref, **kw)(X), view(mine, **kw)(X)
        np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
        assert_trees_close(pure(F, ref), pure(nnx, mine))


def test_view_keeps_sharing_structure_and_original_graphdef():
    model = make_block(nnx)
    model.alias = model.linear
    model.items = [model.bn, {"again": model.bn}]
    graphdef = nnx.graphdef(model)
    v = view(model, deterministic=True)
    assert v.alias is v.linear and v.items[0] is v.bn and v.items[1]["again"] is v.bn
    assert v.items is not model.items
    assert nnx.graphdef(model) == graphdef
    assert nnx.graphdef(view(model)) == graphdef  # no kwargs: a structurally equal copy


def test_view_with_cycle():
    model = make_block(nnx)
    model.linear.parent = model
    v = view(model, deterministic=True)
    assert v.linear.parent is v and v.dropout.deterministic


def test_view_only_filter():
    model = make_block(nnx)
    v = view(model, only=nnx.Dropout, deterministic=True)
    assert flags(v) == (True, False, None)
    v = view(model, only=nnx.PathContains("attn"), deterministic=True)
    assert flags(v) == (False, False, True)


def test_view_unknown_keys():
    model = make_block(nnx)
    with pytest.raises(ValueError, match=r"Unused keys found in nnx.view: \['bar', 'foo'\]") as e:
        view(model, foo=1, bar=2, deterministic=True)
    assert "use_running_average" in str(e.value) and "raise_if_not_found=False" in str(e.value)
    with pytest.raises(ValueError, match="Unused keys"):
        F.view(make_block(F), foo=1)  # the oracle agrees
    # a key only accepted by a Module the filter left out is unused too
    with pytest.raises(ValueError, match=r"\['use_running_average'\]"):
        view(model, only=nnx.Dropout, use_running_average=True)
    v = view(model, only=nnx.Dropout, use_running_average=True, raise_if_not_found=False)
    assert v.bn.use_running_average is False
    with pytest.raises(ValueError, match="Unused keys"):
        view(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), deterministic=True)


class Custom(nnx.Module):
    def __init__(self):
        self.mode = "a"
        self.seen = None

    def set_view(self, **kwargs):
        self.seen = kwargs


class Typed(nnx.Module):
    def __init__(self):
        self.flag = False

    def set_view(self, flag: bool = False, *, scale: float | None = None):
        """Toggles things.

        Args:
          flag: turns the flag on.
            Spans two lines.
          scale: a scale factor.

        Returns:
          Nothing.
        """
        self.flag = flag
        if scale is not None:
            self.scale = scale


class Pair(nnx.Module):
    def __init__(self, *items):
        self.items = list(items)


def test_set_view_hooks_with_var_keyword_and_keyword_only():
    model = Pair(Custom(), Typed())
    v = view(model, flag=True, scale=2.0, anything=3)
    assert v.items[0].seen == dict(flag=True, scale=2.0, anything=3)
    assert v.items[1].flag is True and v.items[1].scale == 2.0
    assert model.items[0].seen is None and model.items[1].flag is False


def test_view_of_nnx_list():
    v = view(nnx.List([nnx.Dropout(0.1)]), deterministic=True)
    assert v[0].deterministic


def test_view_under_jit():
    model = make_block(nnx)
    ev = view(model, **FLAGS)
    tr = view(model, deterministic=False, use_running_average=False)
    step = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(step(ev, X), ev(X), rtol=1e-6)
    mean = model.bn.mean[...]
    step(tr, X)
    assert not np.allclose(model.bn.mean[...], mean)  # update propagated to the original


def test_view_tree_mode():
    model = make_block(nnx)
    assert view(model, graph=False, deterministic=True).dropout.deterministic
    model.alias = model.linear
    with pytest.raises(ValueError, match="tree mode.*'alias'"):
        view(model, graph=False, deterministic=True)


# -- with_attributes ---------------------------------------------------------------------------
def test_with_attributes_copies_and_shares():
    model = make_block(nnx)
    new = with_attributes(model, deterministic=True, use_running_average=True)
    assert flags(new) == (True, True, True)
    assert flags(model) == (False, False, None)
    assert new.bn.mean is model.bn.mean and new.linear.kernel is model.linear.kernel
    ref = F.with_attributes(make_block(F), deterministic=True, use_running_average=True)
    assert flags(ref) == flags(new)


def test_with_attributes_filter_and_errors():
    model = make_block(nnx)
    new = with_attributes(model, only=nnx.Dropout, rate=0.25)
    assert new.dropout.rate == 0.25 and model.dropout.rate == 0.5
    new = with_attributes(model, only=nnx.BatchNorm, deterministic=True, raise_if_not_found=False)
    assert new.dropout.deterministic is False
    msg = r"Could not find at least one instance of the following attributes: \['nope'\]"
    with pytest.raises(ValueError, match=msg):
        with_attributes(model, nope=1)
    with pytest.raises(ValueError, match=msg):
        F.with_attributes(make_block(F), nope=1)


def test_with_attributes_never_writes_into_shared_variables():
    model = make_block(nnx)
    new = with_attributes(model, mean=jnp.ones(3))
    assert isinstance(new.bn.mean, nnx.BatchStat) and new.bn.mean is not model.bn.mean
    np.testing.assert_array_equal(new.bn.mean[...], 1.0)
    np.testing.assert_array_equal(model.bn.mean[...], 0.0)


# -- view_info ---------------------------------------------------------------------------------
def test_view_info_lists_hooks():
    text = view_info(make_block(nnx))
    classes = [line for line in text.splitlines() if not line.startswith(" ")]
    assert classes == ["BatchNorm:", "Dropout:", "MultiHeadAttention:"]
    assert "  use_running_average: bool | None = None" in text
    assert "  max_length: int | None = None" in text
    assert view_info(nnx.Linear(2, 2, rngs=nnx.Rngs(0))) == ""
    assert view_info(make_block(nnx), only=nnx.Dropout).splitlines()[0] == "Dropout:"


def test_view_info_signature_lines_match_oracle():
    def signature_lines(text):
        # class and argument lines (descriptions are worded differently)
        return [line for line in text.splitlines() if not line.startswith("    ")]

    ref = F.view_info(make_block(F))
    mine = view_info(make_block(nnx))
    assert signature_lines(mine) == signature_lines(ref)


def test_view_info_docstring_parsing_and_fallback():
    text = view_info(Pair(Typed(), Custom()))
    assert text.splitlines() == [
        "Custom:",
        "  set_view(self, **kwargs)",
        "Typed:",
        "  flag: bool = False",
        "    turns the flag on.",
        "    Spans two lines.",
        "  scale: float | None = None",
        "    a scale factor.",
    ]
