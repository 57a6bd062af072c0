"""tokray: train vision models on stored VQ tokens (SeiT, SeiT++) with Ray.

The source root ``platform/`` deliberately has no ``__init__.py``: a package named
``platform`` would shadow the standard library module on every Ray worker.
"""

__version__ = "0.1.0"
