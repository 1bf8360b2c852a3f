"""The C kernels; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("abstream.store._dictionary", ["store/_dictionary.c"], extra_compile_args=["-O3"]),
    Extension("abstream.store._kernels", ["store/_kernels.c"], extra_compile_args=["-O3"]),
    Extension("abstream.service._events", ["service/_events.c"], extra_compile_args=["-O3"]),
    Extension("abstream.clients._ndjson", ["clients/_ndjson.c"], extra_compile_args=["-O3"]),
])
