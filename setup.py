"""Builds the one optional C module (refax/_graph/_fastcheck.c, the walk cache's comparison).

Everything else is in pyproject.toml. Without a C compiler the build skips the module and
refax uses the pure-Python version of the same comparison.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[Extension("refax._graph._fastcheck", ["refax/_graph/_fastcheck.c"], optional=True)]
)
