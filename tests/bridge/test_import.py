"""The core never imports Flax; the bridge says how to get it when it is missing."""

import subprocess
import sys
import textwrap

BLOCK_FLAX = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoFlax(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "flax" or name.startswith("flax."):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, NoFlax())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_FLAX + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_core_works_without_flax():
    r = _run(
        """
        import jax.numpy as jnp
        import refax
        from refax import nnx
        model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        assert model(jnp.ones((1, 2))).shape == (1, 3)
        assert not any(m == "flax" or m.startswith("flax.") for m in sys.modules)
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_bridge_without_flax_says_how_to_install():
    r = _run(
        """
        for how in ("import refax.nnx.bridge", "from refax import nnx; nnx.bridge"):
            try:
                exec(how)
            except ImportError as e:
                assert "pip install refax[linen]" in str(e), str(e)
            else:
                raise AssertionError(how + " did not raise")
        print("ok")
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_lazy_attribute_with_flax():
    import refax
    from refax import nnx
    from refax.nnx import bridge

    assert nnx.bridge is bridge
    assert refax.bridge is bridge
