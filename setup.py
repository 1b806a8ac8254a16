"""Builds only the optional compiled extensions; all metadata is in pyproject.toml.

* The C++ CPU extension (csrc/ops.cpp + csrc/cpu/*.cpp) is built when a C++ compiler is found, unless
  SPARSE_ENGINE_BUILD=0. A failed build prints one warning and the install goes on: the library then
  runs its other backends (sparse-engine info says which). SPARSE_ENGINE_BUILD=1 makes a
  failure fatal.
* The CUDA extension (csrc/cuda/*.cu) is built with SPARSE_ENGINE_CUDA=1, or automatically when the
  installed torch has CUDA and nvcc is found.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))

ext_modules, cmdclass = [], {}
try:
    from build_ext import extensions  # csrc/build_ext.py: knows the sources and flags
except ImportError as e:  # no csrc/build_ext.py or no torch at build time
    print(f"sparse_engine: compiled extensions not built ({e}); pure-Python install", file=sys.stderr)
else:
    ext_modules, cmdclass = extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
