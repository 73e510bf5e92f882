"""The app layer: the command-line entry points (Hydra, argparse, W&B) over the ``me5`` library.

``python -m me5.train`` (:mod:`me5.app.train`), ``python -m me5.evaluate`` (:mod:`me5.app.evaluate`),
``python -m me5.prepare`` (:mod:`me5.app.prepare`). Nothing in ``me5`` outside this package imports it. The
benchmarks are not part of the package: they live in the repository's top-level ``benchmarks/``.
"""
