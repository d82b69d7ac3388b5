"""Measuring one cell in the current process: timing, the memory probe, and their typed settings.
"""
