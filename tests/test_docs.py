"""The documentation site (docs/site, built by ``make docs``) stays true.

* Every ```` ```python ```` block of a guide page runs: the blocks of one page are executed in
  order in one namespace (so later blocks use what earlier ones defined), in a fresh temporary
  working directory. A block directly followed by an ```` ```output ```` block must print that
  output (compared like a doctest with ELLIPSIS and NORMALIZE_WHITESPACE). Other fences
  (```` ```sh ````, ```` ```text ````) are shown, not run.
* The API reference covers the public API: every name in ``dir(refax.nnx)`` that does not
  start with ``_`` and is not a module has a ``::: refax.nnx.NAME`` entry on a reference page,
  except JAX's own activation functions re-exported unchanged (``nnx.relu`` is
  ``jax.nn.relu``), which the Layers page lists in a table linking to JAX's documentation
  instead. The submodules of ``refax.nnx`` are listed by name on the reference overview.
* Every ``::: target`` of the reference pages can be imported, so a renamed function fails here
  and not only in the (slower) strict site build.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import pathlib
import re
import types

import jax
import pytest

from refax import nnx

ROOT = pathlib.Path(__file__).resolve().parent.parent
SITE = ROOT / "docs" / "site"
REFERENCE = SITE / "reference"
GUIDES = sorted(p for p in SITE.glob("*.md"))
NEEDS_8_DEVICES = {"scaling.md"}

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def code_blocks(path: pathlib.Path) -> list[tuple[int, str, str | None]]:
    """``(first line number, python source, expected output or None)`` for each python block."""
    text = path.read_text()
    fences = [
        (m.group(1), m.group(2), text.count("\n", 0, m.start(2)) + 1, m.start(), m.end())
        for m in _FENCE.finditer(text)
    ]
    blocks = []
    for i, (lang, body, line, _, end) in enumerate(fences):
        if lang != "python":
            continue
        expected = None
        if i + 1 < len(fences):
            nxt_lang, nxt_body, _, nxt_start, _ = fences[i + 1]
            if nxt_lang == "output" and not text[end:nxt_start].strip():
                expected = nxt_body
        blocks.append((line, body, expected))
    return blocks


def test_guides_have_code():
    assert GUIDES, SITE
    pages_with_code = {p.name for p in GUIDES if code_blocks(p)}
    for name in [
        "getting-started.md",
        "object-model.md",
        "transforms.md",
        "randomness.md",
        "training.md",
        "scaling.md",
        "performance.md",
        "migration.md",
    ]:
        assert name in pages_with_code, name


@pytest.mark.parametrize("page", [p.name for p in GUIDES])
def test_guide_code_runs(page, tmp_path, monkeypatch):
    if page in NEEDS_8_DEVICES and jax.device_count() < 8:
        pytest.skip(
            f"{page} needs 8 devices, found {jax.device_count()}: run with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 (as `make test` does)"
        )
    path = SITE / page
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.removesuffix('.md').replace('-', '_')}"}
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for line, source, expected in code_blocks(path):
        # padding so that tracebacks name the Markdown file's own line numbers
        code = compile("\n" * (line - 1) + source, str(path), "exec")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, namespace)
        if expected is not None:
            got = out.getvalue()
            assert checker.check_output(expected, got, flags), (
                f"{page}, block at line {line}: printed\n{got}\nbut the page shows\n{expected}"
            )


def _reference_text() -> str:
    return "\n".join(p.read_text() for p in sorted(REFERENCE.glob("*.md")))


def _public_names() -> tuple[list[str], list[str]]:
    names = [n for n in dir(nnx) if not n.startswith("_")]
    modules = [n for n in names if isinstance(getattr(nnx, n), types.ModuleType)]
    return [n for n in names if n not in modules], modules


def _is_jax_reexport(name: str) -> bool:
    module = getattr(getattr(nnx, name), "__module__", None) or ""
    return module.startswith("jax")


def test_reference_covers_every_public_name():
    text = _reference_text()
    documented = set(re.findall(r"^::: refax\.nnx\.(\w+)\s*$", text, re.MULTILINE))
    names, _ = _public_names()
    missing = [n for n in names if not _is_jax_reexport(n) and n not in documented]
    assert not missing, f"no `::: refax.nnx.NAME` entry in docs/site/reference for {missing}"
    layers = (REFERENCE / "layers.md").read_text()
    jax_names = [n for n in names if _is_jax_reexport(n)]
    assert jax_names  # the activations: this rule must keep meaning something
    unlisted = [n for n in jax_names if f"| `nnx.{n}` |" not in layers]
    assert not unlisted, f"JAX re-exports missing from the activations table: {unlisted}"
    unknown = sorted(documented - set(names))
    assert not unknown, f"reference entries for names refax.nnx does not have: {unknown}"


def test_reference_lists_submodules():
    overview = (REFERENCE / "index.md").read_text()
    _, modules = _public_names()
    missing = [m for m in modules if f"`nnx.{m}`" not in overview]
    assert not missing, f"submodules not listed in docs/site/reference/index.md: {missing}"


def _resolve(target: str) -> object:
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def test_reference_targets_resolve():
    targets = re.findall(r"^::: ([\w.]+)\s*$", _reference_text(), re.MULTILINE)
    assert len(targets) > 150
    for target in targets:
        _resolve(target)


def test_site_pages_are_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    for page in SITE.rglob("*.md"):
        rel = page.relative_to(SITE).as_posix()
        assert f": {rel}" in config, f"{rel} is not in mkdocs.yml's nav"
