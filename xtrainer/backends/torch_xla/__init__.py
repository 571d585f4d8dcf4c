"""The torch_xla backend: PyTorch modules compiled by XLA as SPMD programs (TPU, or PJRT CPU for tests).

Importing this package does not import torch_xla; `backend.py` does.
"""
