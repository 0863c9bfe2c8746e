"""Text repr, treescope rendering and ``display`` of Modules and Variables."""

import jax.numpy as jnp
import numpy as np
import pytest
import treescope

from refax import _display
from refax._display import display, object_repr
from refax._module import Module
from refax._object import Object
from refax._variables import BatchStat, Param

LINEAR_REPR = """\
Linear( # Param: 15 (60 B)
  b=Param( # 5 (20 B)
    value=Array(shape=(5,), dtype=dtype('float32'))
  ),
  din=2,
  dout=5,
  w=Param( # 10 (40 B)
    value=Array(shape=(2, 5), dtype=dtype('float32'))
  )
)"""


class Linear(Module):
    def __init__(self, din, dout):
        self.b = Param(jnp.zeros((dout,)))
        self.din, self.dout = din, dout
        self.w = Param(jnp.ones((din, dout)))


class Block(Module):
    def __init__(self):
        self.linear = Linear(2, 5)
        self.mean = BatchStat(jnp.zeros((8,)))
        self.name = "block"


class Node(Object):
    pass


def test_linear_exact_text():
    assert repr(Linear(2, 5)) == LINEAR_REPR
    assert object_repr(Linear(2, 5)) == LINEAR_REPR


def test_nested_modules_indent_and_stats():
    text = repr(Block())
    assert text.splitlines()[0] == (
        "Block( # Param: 15 (60 B), BatchStat: 8 (32 B), Total: 23 (92 B)"
    )
    nested = "\n".join("  " + line for line in LINEAR_REPR.splitlines())
    assert "  linear=" + nested.lstrip() + ",\n" in text
    assert "  mean=BatchStat( # 8 (32 B)\n" in text
    assert text.endswith("  name='block'\n)")


def test_shared_submodule_printed_once():
    m = Module()
    m.first = m.second = Linear(2, 5)
    text = repr(m)
    assert text.count("din=2") == 1
    assert "  second=Linear(...)\n" in text
    # the shared module's Variables are counted once in the header
    assert text.startswith("Module( # Param: 15 (60 B)\n")


def test_cycle_terminates():
    a, b = Node(), Node()
    a.b = b
    b.a = a
    assert repr(a) == "Node(\n  b=Node(\n    a=Node(...)\n  )\n)"
    a.self = a
    assert repr(a).count("Node(...)") == 2


def test_list_dict_tuple_of_modules():
    m = Module()
    m.layers = [Linear(1, 2), Linear(2, 3)]
    m.heads = {"x": Linear(1, 1), "n": 3}
    m.pair = (Linear(1, 1),)
    m.plain = [1, (2, 3), {"k": "v"}]
    text = repr(m)
    assert "  layers=[\n    Linear( # Param: 4 (16 B)\n" in text
    assert "\n    ),\n    Linear( # Param: 9 (36 B)\n" in text
    assert "  heads={\n    'x': Linear( # Param: 2 (8 B)\n" in text
    assert "    'n': 3\n  },\n" in text
    assert "  pair=(\n    Linear(" in text and "    ),\n  ),\n" in text
    assert "  plain=[1, (2, 3), {'k': 'v'}]\n" in text
    assert text.startswith("Module( # Param: 17 (68 B)\n")


def test_arrays_and_small_values():
    m = Module()
    m.arr = np.ones((3, 4), np.float32)
    m.scalar = jnp.array(2.0)
    m.private = 1
    m._hidden = "x"
    text = repr(m)
    assert "  arr=Array(shape=(3, 4), dtype=dtype('float32')),\n" in text
    assert "  scalar=Array(2., dtype=float32, weak_type=True),\n" in text
    assert "_hidden" not in text and "_pytree__state" not in text
    assert text.startswith("Module(\n")  # plain arrays are not Variables: no stats


def test_variable_metadata_and_pytree_value():
    m = Module()
    m.w = Param(jnp.ones((2, 2)), sharding_names=("a", None))
    m.t = Param((jnp.ones(3), 7))
    text = repr(m)
    assert "    out_sharding=('a', None)\n" in text
    assert "    value=(Array(shape=(3,), dtype=dtype('float32')), 7)\n" in text
    assert "hijax" not in text


def test_empty_module():
    assert repr(Module()) == "Module()"


def test_human_bytes_in_header():
    m = Module()
    m.w = Param(jnp.zeros((100, 30)))
    assert repr(m).startswith("Module( # Param: 3,000 (12.0 KB)\n")


def test_max_repr_depth(monkeypatch):
    monkeypatch.setattr(_display, "max_repr_depth", 1)
    text = repr(Block())
    assert "  linear=Linear(...),\n" in text
    assert "  mean=BatchStat(...),\n" in text
    monkeypatch.setattr(_display, "max_repr_depth", 2)
    text = repr(Block())
    assert "    w=Param(...)\n" in text
    monkeypatch.setattr(_display, "max_repr_depth", 0)
    assert repr(Block()) == "Block(...)"


def test_repr_matches_flax_oracle():
    nnx = pytest.importorskip("flax.nnx")

    def build(ns, base):
        class Lin(base):
            def __init__(self, din, dout):
                self.din, self.dout = din, dout
                self.w = ns.Param(jnp.ones((din, dout)))
                self.b = ns.Param(jnp.zeros((dout,)))

        class Model(base):
            def __init__(self):
                self.lin = Lin(2, 3)
                self.again = self.lin
                self.mean = ns.BatchStat(jnp.zeros((4,)))
                self.tiny = ns.Param(jnp.ones((1,)))
                self.arr = jnp.ones((2, 2))
                self.tag = "m"

        Model.__name__ = "Model"
        return Model()

    class Ours:
        Param, BatchStat = Param, BatchStat

    assert repr(build(Ours, Module)) == repr(build(nnx, nnx.Module))


def test_treescope_module_and_variable():
    text = treescope.render_to_text(Block())
    for name in ("Block(", "linear=", "mean=", "name=", "din=", "w=", "Param: 15 (60 B)"):
        assert name in text
    text = treescope.render_to_text(Param(jnp.ones((2, 3)), tag="w"))
    assert text.startswith("Param(") and "value=" in text and "tag='w'" in text


def test_treescope_state_is_a_wrapped_dict_of_its_levels():
    from refax import nnx

    state = nnx.State({"b": Param(jnp.float32(1.0)), "layers": {0: {"w": jnp.float32(2.0)}}})
    assert treescope.render_to_text(state) == (
        "State({\n"
        "  'b': Param(value=<jax.Array(1., dtype=float32)>),\n"
        "  'layers': {0: {'w': <jax.Array(2., dtype=float32)>}},\n"
        "})"
    )
    assert treescope.render_to_text(nnx.State({})) == "State({})"
    assert treescope.render_to_html(state).startswith("<")  # the notebook path renders too


def test_treescope_handles_sharing_and_cycles():
    a, b = Node(), Node()
    a.b = b
    b.a = a
    a.lin = a.lin2 = Linear(1, 1)
    text = treescope.render_to_text(a)
    assert "cyclic reference" in text and "lin2=" in text


def test_display_prints(capsys):
    display(Linear(2, 5), "hello")
    out = capsys.readouterr().out
    assert out == LINEAR_REPR + "\nhello\n"


def test_dict_with_unsortable_keys():
    m = Module()
    m.d = {1: Param(jnp.ones(2)), "a": 2}
    text = repr(m)
    assert text.startswith("Module( # Param: 2 (8 B)\n") and "    1: Param(" in text
