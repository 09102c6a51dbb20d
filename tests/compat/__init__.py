"""The Lightning compatibility suite: recipes from Lightning's documentation, each run as a
drift session of two nodes (``node.py``) by ``tests/test_compat.py``."""
