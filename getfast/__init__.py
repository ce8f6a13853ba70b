"""getfast: distil diffusion models into one-step generators, with fused kernels.

``import getfast`` imports nothing else (no torch); import the subpackage you use, e.g.
``from getfast.sampling import load`` or ``import getfast.ops``.
"""

__version__ = "0.1.0"
