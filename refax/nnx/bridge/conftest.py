"""Doctest collection of the bridge needs Flax's Linen: skip it where Linen is absent."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("flax") else ["*.py"]
