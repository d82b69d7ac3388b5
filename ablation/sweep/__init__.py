"""The Hydra shell and process plumbing: config conversion, jobs, worker processes, failures.
"""
