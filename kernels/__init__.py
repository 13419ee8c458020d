"""Fused ops, each with its plain-PyTorch reference beside it. Installed as fastdreamer.kernels."""
