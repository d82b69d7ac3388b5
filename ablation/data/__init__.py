"""Training data on the device: synthetic and real datasets, and the batch samplers.
"""
