"""``python -m hpcnn.train``: the training command.

Flags and a TOML file resolve into one ``Config``; the run directory is created, the job's layout
announced, and ``Trainer.from_config(cfg, comm).fit()`` trains (the model from ``--hidden``, the
data from ``--data``). This module is the face: it turns errors into one
message from rank 0 and an exit code on every rank (``run_command``), and turns the result into
the final line and the exit code (0, 75 after a stop signal, 130 after Ctrl-C).
"""

import sys

if __name__ == "__main__":
    # `python -m hpcnn.train`: catch Ctrl-C and the stop signals before the imports below (numpy,
    # mpi4py, h5py: a third of a second in which a Ctrl-C would print a traceback on every rank).
    from hpcnn.parallel.preempt import EarlySignals

    _EARLY = EarlySignals().__enter__()

import dataclasses  # noqa: E402  (the imports below follow the signal catcher above)
import time

from hpcnn.command import run_command
from hpcnn.config import resolve
from hpcnn.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED
from hpcnn.parallel.comm import Comm, blas_threads
from hpcnn.parallel.preempt import EarlySignals, Interrupted
from hpcnn.training.dryrun import dry_run
from hpcnn.training.engine import Result
from hpcnn.training.report import announce_layout, facts, scores_text
from hpcnn.training.setup import open_run_dir
from hpcnn.training.trainer import Trainer, fit

__all__ = ["Result", "fit", "main"]


def _main(comm: Comm, argv, early: EarlySignals) -> int:
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    with comm.agreed(comm.debug):
        cfg = resolve(argv, is_root=comm.is_root)
    comm.debug = cfg.debug
    if dry:
        early.__exit__(None, None, None)  # nothing to stop at a step: Ctrl-C ends the dry run at once
        blas_threads(comm.local_size, cfg.threads)
        return dry_run(cfg, comm)
    given = cfg  # what config.toml records: run_dir resolved, checkpoint_dir as given
    cfg, run = open_run_dir(cfg, comm)
    if not cfg.checkpoint_dir:
        early.release()  # nowhere to save a stop: signals act as they would without hpcnn
    threads, placement = announce_layout(cfg, comm)
    if run is not None:
        recorded = dataclasses.replace(given, run_dir=str(run.path))
        run.prepare(recorded.to_toml(), argv, facts(cfg, comm, threads, placement))
        comm.print0(f"run directory: {run.path}")
    t0 = time.perf_counter()
    try:
        result = Trainer.from_config(cfg, comm, log=comm.print0, run=run, terminal=True).fit()
    except Interrupted as stop:  # every rank, after the agreed stop
        if run is not None:
            run.close()
        comm.print0(f"hpcnn: {stop.message} (exit code {EXIT_INTERRUPTED})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException:
        if run is not None:
            run.discard_if_unused()  # e.g. refused: the directory holds checkpoints of another run
        raise
    if run is not None:
        run.close()
    if result.left:  # --elastic: ranks died and this one left; the survivors' rank 0 speaks
        return EXIT_OK
    if result.stopped:
        comm.print0(
            f"hpcnn: stopped by {result.stopped} after step {result.steps}; continue with "
            f"--resume auto (exit code {EXIT_PREEMPTED})"
        )
        return EXIT_PREEMPTED
    final = result.final
    text = f"final {final['split']} {scores_text(final)}"
    if final["accuracy"] is not None:
        text += f" ({final['rows']} rows)"
    comm.print0(f"{text}; {result.steps} steps in {time.perf_counter() - t0:.1f} s")
    if result.privacy is not None:
        spent = result.privacy
        comm.print0(
            f"privacy spent: epsilon {spent['epsilon']:.3f} at delta {spent['delta']:g} "
            f"({spent['accountant']}, noise multiplier {spent['noise_multiplier']:.4g}, "
            f"{spent['steps']} private steps)"
        )
    return EXIT_OK


def main(argv=None) -> int:
    # From the first line: a stop signal during start-up is honoured after the first step.
    early = globals().pop("_EARLY", None) or EarlySignals().__enter__()
    try:
        return run_command(
            lambda comm, args: _main(comm, args, early), sys.argv[1:] if argv is None else list(argv)
        )
    finally:
        early.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())
