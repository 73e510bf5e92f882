"""The benchmarks: run from the repository root as ``python -m benchmarks.<name>`` (see ``benchmarks/README.md``).

Not part of the installed ``me5`` package; they import the library and ``me5.app``, and nothing under ``src/``
imports them.
"""
