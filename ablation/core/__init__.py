"""The algorithm: gradient engines, the DP-SGD step, privacy accounting.

Imports nothing else of the package (only JAX, optax and dp-accounting).
"""
