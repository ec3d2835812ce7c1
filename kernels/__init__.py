"""Triton kernels for the GPU path, each with its plain torch reference beside it.

Installed as ``rmserve.kernels`` (the folder is mapped under the ``rmserve`` namespace so that it
cannot shadow the unrelated ``kernels`` package on PyPI).
"""
