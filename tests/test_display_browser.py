"""Notebook display and the built docs, rendered by a real browser (headless Chromium).

Treescope's HTML is a script that draws the tree with JavaScript, into shadow DOM, after
decompressing its payload; only a browser shows whether the tree really appears. Each test
writes a page, loads it with ``chromium --headless --dump-dom`` (after running its scripts for
a few seconds of virtual time) and reads the text the page shows. A small probe script copies
the visible text, shadow roots included, into a ``<pre id="probe">`` that ``--dump-dom`` keeps.

The tests skip when no Chromium binary is found (Debian: ``apt-get install chromium``);
``.ci/run`` installs it first, so CI runs them.
"""

from __future__ import annotations

import html
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest

from refax import _display, nnx

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHROMIUM = next(
    (
        path
        for name in ("chromium", "chromium-browser", "google-chrome", "chrome")
        if (path := shutil.which(name))
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH (apt-get install chromium; .ci/run installs it)",
)

# Copies the page's text, descending into shadow roots, into <pre id="probe"> once the
# page's own scripts had time to run (timers follow chromium's virtual time).
PROBE = """
<pre id="probe"></pre>
<script>
  function refaxCollect(node, out) {
    if (node.nodeType === Node.TEXT_NODE) { out.push(node.nodeValue); return; }
    if (node.nodeName === "SCRIPT" || node.nodeName === "STYLE" || node.id === "probe") return;
    if (node.shadowRoot) refaxCollect(node.shadowRoot, out);
    for (const child of node.childNodes) refaxCollect(child, out);
  }
  // poll until treescope has replaced its "(Loading...)" placeholders, then copy the text
  let refaxTries = 0;
  function refaxProbe() {
    const out = [];
    refaxCollect(document.body, out);
    const text = out.join("");
    if (text.includes("(Loading...)") && ++refaxTries < 300) {
      setTimeout(refaxProbe, 100);
      return;
    }
    document.getElementById("probe").textContent = text;
  }
  setTimeout(refaxProbe, 100);
</script>
"""


def browser_dom(page: pathlib.Path) -> str:
    """The DOM of ``page`` after its scripts ran, as serialised by headless Chromium."""
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=30000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def probed_text(page: pathlib.Path, attempts: int = 3) -> str:
    """The page's text once treescope rendered it. On a loaded machine chromium may run out of
    its virtual-time budget before treescope's scripts finish; such a run is retried."""
    for _ in range(attempts):
        dom = browser_dom(page)
        match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
        assert match, f"the probe did not run; DOM starts with {dom[:500]!r}"
        text = html.unescape(match.group(1))
        if "(Loading...)" not in text:
            break
    return text


def write_page(tmp_path: pathlib.Path, body: str) -> pathlib.Path:
    page = tmp_path / "render.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>refax display</title>"
        f"</head><body>{body}{PROBE}</body></html>"
    )
    return page


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.norm = nnx.BatchNorm(3, rngs=rngs)


def displayed_html(obj, monkeypatch) -> str:
    """The HTML ``nnx.display(obj)`` sends to a notebook front end (via treescope)."""
    import treescope

    shown = []
    monkeypatch.setattr(_display, "_in_notebook", lambda: True)
    monkeypatch.setattr(treescope, "display", shown.append)
    nnx.display(obj)
    assert shown == [obj], "nnx.display did not go through treescope in a notebook"
    return treescope.render_to_html(obj)


def test_module_tree_renders_in_browser(tmp_path, monkeypatch):
    text = probed_text(write_page(tmp_path, displayed_html(Block(nnx.Rngs(0)), monkeypatch)))
    for expected in ["Block", "linear=", "Linear", "kernel=", "Param", "(2, 3)", "BatchStat"]:
        assert expected in text, f"{expected!r} not shown; the browser shows:\n{text[:3000]}"
    assert "Param: 15 (60 B)" in text  # the per-type summary comment of the whole Block


def test_variable_and_state_render_in_browser(tmp_path, monkeypatch):
    import treescope

    var = nnx.Param(jnp.zeros((4, 5)), tag="w")
    state = nnx.state(Block(nnx.Rngs(0)), nnx.Param)
    body = displayed_html(var, monkeypatch) + "<hr>" + treescope.render_to_html(state)
    text = probed_text(write_page(tmp_path, body))
    for expected in ["Param", "(4, 5)", "tag=", "'w'", "kernel", "(2, 3)"]:
        assert expected in text, f"{expected!r} not shown; the browser shows:\n{text[:3000]}"


def test_outside_a_notebook_display_prints(capsys):
    nnx.display(nnx.Param(jnp.zeros((2, 3))))
    assert "Param" in capsys.readouterr().out


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> pathlib.Path:
    """``site/`` as ``make docs`` left it, else a fresh build (needs the docs extra)."""
    index = ROOT / "site" / "index.html"
    if index.exists():
        return index.parent
    mkdocs = pathlib.Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.skip("no built site/ and mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_docs_index_renders_in_browser(built_site):
    dom = browser_dom(built_site / "index.html")
    assert re.search(r"<title>[^<]*refax[^<]*</title>", dom), dom[:1000]
    assert "Where to go next" in dom  # the page body, not just the head
    assert "Getting started" in dom  # the navigation the theme's scripts build


def test_docs_reference_renders_in_browser(built_site):
    dom = browser_dom(built_site / "reference" / "graph.html")
    assert 'id="refax.nnx.split"' in dom  # an mkdocstrings entry, anchored
    assert "Splits a graph" in dom  # its docstring
