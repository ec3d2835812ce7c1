"""Triton kernels for the GPU path, each with its plain torch reference beside it.

The package is ``rmserve_kernels``, in the folder ``kernels/rmserve_kernels`` and installed with rmserve.
The top-level ``kernels/`` folder holds no module of its own, so from the repository root
``import kernels`` still finds PyPI's ``kernels`` package, which transformers imports.
"""
