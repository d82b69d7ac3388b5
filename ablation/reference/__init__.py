"""Other frameworks' rows, timed by the same protocol as the JAX engines (Opacus/PyTorch).
"""
