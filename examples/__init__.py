"""Example models for lightning-drift (installed as ``lightning_drift_examples``).

- :mod:`.charlm`: a small character-level transformer trained on the Python standard library's
  own source files, text every machine with Python has.
- :mod:`.mock_train`: a seeded linear regression, the quickest thing a drift session can train.
"""
