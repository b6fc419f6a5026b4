"""Meshes, layouts and autograd-aware collectives: how tensors are split across ranks."""
