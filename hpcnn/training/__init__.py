"""Training as a library: the loop, its setup, its reports, and the ``Trainer``.

- ``engine``: ``Training`` (one run's state on this rank: steps, epoch summaries, checkpoints),
  ``fit`` (the bracket: directory lock, agreed Ctrl-C, stall inspector) and ``Result``;
- ``batches``: reading a step's rows, checking them, micro-batches, evaluation over a split;
- ``setup``: data, this rank's pipeline stage, resume, checkpoint-directory lock and checks;
- ``report``: what rank 0 says about a run; ``dryrun``: ``--dry-run``'s memory model.
"""
