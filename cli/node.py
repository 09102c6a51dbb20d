"""``drift-node``: the node side of ``drift``, as the seed installs it.

The same commands as ``drift join``, ``drift train``, ``drift status`` and ``drift id`` (one
implementation, in ``lightning_drift_cli.drift``), without the coordinator and the demo.
"""

from __future__ import annotations

import typer
from lightning_drift_cli import common, drift

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="A node of a lightning-drift session: join one, train the example model, show it.",
)

for _name, _command in (
    ("join", drift.join),
    ("train", drift.train),
    ("status", drift.status),
    ("id", drift.node_id),
):
    app.command(_name)(_command)


def main() -> None:
    common.main(app, common.NODE, optional_values=drift.OPTIONAL_VALUES)


if __name__ == "__main__":
    main()
