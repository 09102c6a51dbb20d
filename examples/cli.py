"""A plain ``LightningCLI`` entry point: any model and data named in a YAML config, trained as
one node of a drift session when the config sets ``trainer.strategy``.

    DRIFT_TOKEN=eyJ... python examples/cli.py fit --config examples/train.yaml

The strategy is configured like any other Lightning strategy::

    trainer:
      strategy:
        class_path: lightning_drift.DriftStrategy
        init_args:
          token: null   # read from DRIFT_TOKEN
          device: auto  # or cuda:1, mps, cpu
      devices: 1        # one device per node (devices="auto" would take every GPU)

``drift join --config examples/train.yaml`` does the same without this file (it sets the
strategy and the token itself).
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import lightning_drift  # noqa: F401  (registers the "drift" strategy name)


def main() -> None:
    # overwrite: the config is saved next to the logs on every run; a second run in the same
    # folder must not fail on the copy from the first.
    LightningCLI(save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
