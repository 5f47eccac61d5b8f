"""Training as a library: the ``Trainer``, the loop, its setup and its reports.

- ``trainer``: ``Trainer`` (model, data, loss, optimizer -> fit/evaluate/predict/save/load) and
  ``fit`` (the bracket every run goes through: directory lock, agreed Ctrl-C, stall inspector);
- ``engine``: ``Training`` (one run's state on this rank: steps, epoch summaries, callbacks,
  checkpoints) and ``Result``;
- ``batches``: reading a step's rows, checking them, micro-batches, evaluation over a split;
- ``setup``: data, this rank's pipeline stage, resume, checkpoint-directory lock and checks;
- ``privacy``: private training (``--dp-sgd``): the accountant, per-example clipping, noise;
- ``report``: what rank 0 says about a run; ``dryrun``: ``--dry-run``'s memory model.
"""
