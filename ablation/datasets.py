"""``python -m ablation.datasets NAME... [--cache-dir DIR]``: fetch and verify datasets ahead.

The loaders live in :mod:`ablation.data.datasets`; this is the entry point.
"""

from ablation.data.datasets import main

if __name__ == "__main__":
    raise SystemExit(main())
