"""Experimental code, never imported by the rest of the package: import a module to use it.

``fused_pallas``: the fused Q-loss as Pallas (Triton) kernels; importing it makes
``implementation='pallas'`` (and ``'pallas_interpret'``) available to
:func:`qtarget.fused.q_cross_entropy_fused`.
"""
