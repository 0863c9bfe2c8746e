"""A griffe extension for refax's docstrings, used by ``mkdocs.yml`` (not part of the site).

refax's docstrings head their doctest examples ``Example:`` (singular); griffe's Google-style
parser only knows ``Examples:`` as a section and would render the singular form as prose, so
``>>>`` lines became Markdown block quotes. This renames the heading before parsing, so the
examples come out as code blocks.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class RefaxDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is not None and "Example:" in doc.value:
            doc.value = _EXAMPLE.sub(r"\1Examples:", doc.value)
