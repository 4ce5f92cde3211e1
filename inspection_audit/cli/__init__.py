"""The ``inspection-audit`` command line: one explicit command list, one module per group.

=============  ==========================================================================
module         commands
=============  ==========================================================================
``lab``        ``train``, ``calibrate``, ``evaluate``, ``sweep``, ``fit-bank`` (the offline lab)
``db``         ``db upgrade | downgrade | current`` (migrations, as their own step)
``review``     ``review``, ``review verdict``
``enqueue``    ``enqueue`` (the producer, from a shell)
``reconcile``  ``reconcile`` (resend what a broker lost: the producer's outbox)
``worker``     ``worker`` (a Celery worker built from one ``Settings``)
``demo``       ``demo`` (the whole pipeline on the embedded default)
``web``        ``serve`` (the review station), ``web hash-password | add-user | add-token``
``export``     ``export`` (reviewed inspections as a dataset for ``train``)
``health``     ``health`` (exit non-zero when inspections wait and nothing is written)
=============  ==========================================================================
"""

from __future__ import annotations

import click

from inspection_audit.cli import (
    db,
    demo,
    enqueue,
    export,
    health,
    lab,
    reconcile,
    review,
    web,
    worker,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Audit an ok/defect classifier's `ok` calls for false negatives."""


COMMANDS: tuple[click.Command, ...] = (
    lab.train,
    lab.calibrate,
    lab.evaluate,
    lab.sweep,
    lab.fit_bank,
    db.db_group,
    review.review,
    enqueue.enqueue,
    reconcile.reconcile,
    worker.worker,
    demo.demo,
    web.serve,
    web.web_group,
    export.export,
    health.health,
)
for _command in COMMANDS:
    main.add_command(_command)
