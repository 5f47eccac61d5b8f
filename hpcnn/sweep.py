"""``python -m hpcnn.sweep SWEEP.toml``: many trainings in one allocation (task parallelism).

The sweep file holds a base training config and its variations::

    [sweep]                    # how to run (flags of the same names override)
    group_size = 2             # ranks per task group; the world is cut into size / group_size groups
    directory = "sweep"        # where tasks and the summary go
    metric = "accuracy"        # sort the summary by held-out accuracy (or "loss")
    ensemble = false           # also score the members' averaged prediction

    [base]                     # any training option (the keys of --config files)
    hidden = [128]
    epochs = 10

    [grid]                     # every combination of these values...
    lr = [0.001, 0.003]
    seed = [0, 1]

    [[tasks]]                  # ...then these tasks, one per entry
    optimizer = "sgd"
    momentum = 0.9
    lr = 0.05

**Scheduling.** Groups are consecutive ranks with a sub-communicator each; a task runs on its group
as an ordinary ``fit`` (data-parallel, or data x pipeline if its config says so). Tasks are handed
out dynamically: a group's first rank takes the next task number from a counter in world rank 0's
memory (``MPI_Fetch_and_op``, no dispatcher loop to wait on) and broadcasts it to its group, so
tasks of different lengths leave no group idle.

**Records.** ``DIRECTORY/tasks/task-NNN/`` holds the task's settings (``task.toml``), its
checkpoints and, once it has ended, ``result.json`` (status ``done`` or ``failed`` with the
message, final metrics, wall time, ranks). A task whose config is invalid or whose training ends
with an error all its ranks agree on (non-finite loss, bad data) is recorded as failed; the sweep
goes on. At the end world rank 0 prints and writes ``summary.csv`` and ``summary.md``, sorted by
the metric; with ``ensemble`` it also scores the average of the members' softmax outputs.

**Preemption and reruns.** Every task checkpoints into its own directory and resumes with
``--resume auto``. A stop signal stops the groups after their current step (each writes a
checkpoint) and the sweep exits with 75; running the same command again skips tasks that have a
``result.json`` and resumes the others. A sweep file whose tasks changed is refused.

**One sweep per directory.** World rank 0 locks ``DIRECTORY`` (``hpcnn.io.dirlock``) before looking
into it and holds the lock until the sweep ends: a second sweep on the same directory is refused
with exit code 2, naming the first one's host and PID. Each task's training locks its own
checkpoint directory as any training does.
"""

import argparse
import csv
import itertools
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from hpcnn.command import run_command
from hpcnn.config import Config, Parser, from_dict, load_toml, parse_toml
from hpcnn.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, JobError, UserError
from hpcnn.io.dirlock import DirectoryLock
from hpcnn.parallel.comm import Comm
from hpcnn.parallel.comm import say as comm_say
from hpcnn.parallel.preempt import INTERRUPT, EarlySignals, Interrupted, StopRequest

STOP = 1 << 40  # added to the task counter by a group that was told to stop: no task is handed out
NO_TASK = -1
OWNED = ("checkpoint_dir", "resume")  # set per task by the sweep


def load_sweep(path) -> tuple[dict, dict, list[dict]]:
    """``(options, base, tasks)`` from a sweep file; each task is the dict of its varied settings."""
    spec = load_toml(path)
    unknown = set(spec) - {"sweep", "base", "grid", "tasks"}
    if unknown:
        raise UserError(f"{path}: unknown table(s) {sorted(unknown)}; expected sweep, base, grid, tasks")
    options, base = spec.get("sweep", {}), spec.get("base", {})
    kinds = {"group_size": int, "directory": str, "metric": str, "ensemble": bool}
    for key, value in options.items():
        if key not in kinds:
            raise UserError(f"{path}: [sweep] has no key {key!r}; valid keys: {', '.join(kinds)}")
        if type(value) is not kinds[key]:
            raise UserError(f"{path}: [sweep] {key} = {value!r}: expected {kinds[key].__name__}")
    grid, listed = spec.get("grid", {}), spec.get("tasks", [])
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid.{key} must be a non-empty list of values")
    tasks = (
        [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())] if grid else []
    )
    tasks += [dict(t) for t in listed]
    tasks = tasks or [{}]
    keys = {f.name for f in fields(Config)}
    for i, settings in enumerate([base, *tasks]):
        where = f"{path}: " + ("[base]" if i == 0 else f"task {i - 1}")
        bad = sorted(set(settings) - keys)
        if bad:
            raise UserError(f"{where}: unknown key(s) {bad}; valid keys: {', '.join(sorted(keys))}")
        owned = sorted(set(settings) & set(OWNED))
        if owned:
            raise UserError(f"{where}: {owned} are set by the sweep (one checkpoint directory per task)")
        if settings.get("elastic"):  # a recovery revokes every communicator of the job, the sweep's too
            raise UserError(
                f"{where}: elastic is for a job of one training: a sweep's groups share the job, and a dead "
                "rank ends the sweep (run it again to finish the remaining tasks)"
            )
        from_dict({**base, **settings}, where)  # types now; values when the task runs
    return options, base, tasks


def task_config(base: dict, settings: dict, directory: Path) -> Config:
    cfg = from_dict({**base, **settings}, "task")
    cfg.checkpoint_dir, cfg.resume = str(directory / "checkpoints"), "auto"
    return cfg


def describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "(base)"


class Sweep:
    """One sweep over the ranks of ``world`` (an ``hpcnn.parallel.comm.Comm``)."""

    def __init__(self, world: Comm, path, group_size=None, directory=None, metric=None, ensemble=None):
        self.world = world
        with world.agreed(world.debug):
            options, self.base, self.tasks = load_sweep(path)
            self.group_size = group_size if group_size is not None else options.get("group_size", 1)
            self.directory = Path(directory or options.get("directory", "sweep"))
            self.metric = metric or options.get("metric", "accuracy")
            self.ensemble = bool(options.get("ensemble", False) if ensemble is None else ensemble)
            if self.metric not in ("accuracy", "loss"):
                raise UserError(f"metric = {self.metric!r}: expected accuracy or loss")
            if self.group_size < 1 or world.size % self.group_size:
                raise UserError(
                    f"group_size = {self.group_size} does not divide the {world.size} ranks into groups"
                )
        self._lock = None
        for note in world.root_decides(lambda: self._prepare_directory(path), world.debug):
            world.print0(note)
        self.invocation = world.bcast(f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")

    def task_dir(self, i: int) -> Path:
        return self.directory / "tasks" / f"task-{i:03d}"

    def _prepare_directory(self, path) -> list[str]:
        """Lock the directory, then record the tasks (``_record_tasks``); returns the lock's notes."""
        self._lock = DirectoryLock.acquire(
            self.directory, "sweep directory", "wait for it to end, or use another --dir"
        )
        try:
            self._record_tasks(path)
        except BaseException:
            self.close()
            raise
        return self._lock.notes

    def close(self) -> None:
        """Release the directory (``run`` does at its end)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _record_tasks(self, path) -> None:
        """Create the task directories, or check that an earlier run's tasks are these tasks."""
        for i, settings in enumerate(self.tasks):
            d = self.task_dir(i)
            recorded = d / "task.toml"
            text = _toml({**self.base, **settings})
            if recorded.exists() and recorded.read_text() != text:
                was, now = (" ".join(t.split()) for t in (recorded.read_text(), text))
                raise UserError(
                    f"{self.directory} holds another sweep (task {i} was: {was}; now: {now}): "
                    "use another --dir for a changed sweep file"
                )
            d.mkdir(parents=True, exist_ok=True)
            recorded.write_text(text)
        (self.directory / "sweep.toml").write_text(Path(path).read_text())

    def run(self, log) -> int:
        try:
            return self._run(log)
        finally:
            self.close()

    def _run(self, log) -> int:
        world, size = self.world, self.group_size
        group_index = world.rank // size
        group = world.Split(group_index, world.rank)
        counter = world.counter()
        stopped, interrupted = False, False
        # A stop signal between tasks (a task's own training catches it while it runs) ends the sweep
        # after the running tasks, like one during a task.
        signals = StopRequest(group)
        with signals:
            while True:
                stopped = stopped or bool(group.max(signals.received))
                interrupted = interrupted or bool(group.max(int(signals.received == INTERRUPT)))
                if stopped and group.is_root:
                    counter.add(STOP)  # no group takes another task
                index = self._take(counter) if group.is_root else None
                index = group.bcast(index)
                if index == NO_TASK:
                    break
                record = self._run_task(index, group, group_index, log)
                stopped = stopped or record["status"] == "stopped"
                interrupted = interrupted or record.get("signal") == INTERRUPT.name
        world.Barrier()
        counter.free()
        group.Free()
        unfinished = any(not (self.task_dir(i) / "result.json").exists() for i in range(len(self.tasks)))
        stopped = bool(world.max(int(stopped))) and unfinished
        interrupted = bool(world.max(int(interrupted))) and unfinished
        if world.is_root:
            self._summary(log)
            if self.ensemble and not stopped:
                self._ensemble(log)
        return EXIT_INTERRUPTED if interrupted else EXIT_PREEMPTED if stopped else EXIT_OK

    def _take(self, counter) -> int:
        """The next task this group should run: one without a result (group root only)."""
        while True:
            i = counter.next()
            if i >= len(self.tasks):
                return NO_TASK
            if not (self.task_dir(i) / "result.json").exists():
                return i

    def _run_task(self, i: int, group: Comm, group_index: int, log) -> dict:
        from hpcnn.training.trainer import fit

        settings, d = self.tasks[i], self.task_dir(i)
        ranks = (
            f"{self.world.rank}-{self.world.rank + group.size - 1}"
            if group.size > 1
            else str(self.world.rank)
        )
        say = comm_say if group.is_root else (lambda text: None)
        say(f"task {i} ({describe(settings)}) on rank(s) {ranks}: started")
        t0 = time.perf_counter()
        record = {"task": i, "settings": settings, "ranks": group.size, "group": group_index,
                  "invocation": self.invocation}  # fmt: skip
        lines = []
        try:
            with group.agreed(group.debug):
                cfg = task_config(self.base, settings, d).validate()
            try:
                result = fit(cfg, group, log=lines.append)
            except Interrupted as stop:  # every rank of the group, after the agreed stop
                result = stop.result
            result.grid.free()
            if result.stopped:
                record.update(status="stopped", message=f"stopped by {result.stopped}", signal=result.stopped)
            else:
                final = result.final
                record.update(status="done", loss=final["loss"], accuracy=final["accuracy"],
                              split=final["split"], steps=result.steps)  # fmt: skip
        except JobError as exc:  # agreed by the group's ranks: this task failed, the sweep goes on
            record.update(status="failed", message=exc.message.splitlines()[-1])
        record["seconds"] = round(time.perf_counter() - t0, 3)
        if group.is_root:
            (d / "log.txt").open("a").write("\n".join(lines) + ("\n" if lines else ""))
            if record["status"] != "stopped":
                _write_json(d / "result.json", record)
            outcome = record["status"]
            if outcome == "done" and record["accuracy"] is not None:
                outcome += f": {record['split']} accuracy {100 * record['accuracy']:.2f}%"
            elif outcome == "done":
                outcome += f": {record['split']} loss {record['loss']:.4f}"
            else:
                outcome += f": {record['message']}"
            say(f"task {i} on rank(s) {ranks}: {outcome} ({record['seconds']:.1f} s)")
        return record

    # --- rank 0, at the end --------------------------------------------------------------------

    def results(self) -> list[dict]:
        out = []
        for i, settings in enumerate(self.tasks):
            path = self.task_dir(i) / "result.json"
            if path.exists():
                out.append(json.loads(path.read_text()))
            else:  # stopped part-way (it has a checkpoint to resume from) or never started
                started = any((self.task_dir(i) / "checkpoints").glob("ckpt-*.h5"))
                out.append(
                    {"task": i, "settings": settings, "status": "unfinished" if started else "not run"}
                )
        return out

    def _summary(self, log) -> None:
        rows = self.results()
        varied = list(dict.fromkeys(k for t in self.tasks for k in t))
        by_accuracy = self.metric == "accuracy"

        def rank(r):  # finished tasks first, best first; tasks without an accuracy by loss after them
            if r["status"] != "done":
                return (2, 0.0)
            if by_accuracy and r["accuracy"] is not None:
                return (0, -r["accuracy"])
            return (1, r["loss"] if r["loss"] == r["loss"] else float("inf"))

        rows.sort(key=rank)
        header = ["task", *varied, "status", "loss", "accuracy", "seconds", "ranks"]
        table = [self._row(r, varied) for r in rows]
        with open(self.directory / "summary.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([header, *table])
        md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(row) + " |" for row in table]
        (self.directory / "summary.md").write_text("\n".join(md) + "\n")
        widths = [max(len(h), *(len(row[c]) for row in table)) for c, h in enumerate(header)]
        log(f"sweep summary ({len(rows)} tasks, sorted by {self.metric}; {self.directory}/summary.csv):")
        for row in [header, *table]:
            log("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())

    def _row(self, r: dict, varied: list) -> list[str]:
        done = r["status"] == "done"
        status = r["status"] if "message" not in r else f"{r['status']}: {r['message']}"
        accuracy = f"{100 * r['accuracy']:.2f}%" if done and r["accuracy"] is not None else ""
        return [
            str(r["task"]),
            *[_text(r["settings"].get(k, self.base.get(k, "-"))) for k in varied],
            status,
            f"{r['loss']:.4f}" if done else "",
            accuracy,
            f"{r['seconds']:.1f}" if "seconds" in r else "",
            str(r.get("ranks", "")),
        ]

    def _ensemble(self, log) -> None:
        """Average the softmax outputs of every finished member on the held-out rows (rank 0)."""
        from hpcnn.evaluate import member_probabilities
        from hpcnn.io.checkpoints import checkpoints

        members = [r for r in self.results() if r["status"] == "done"]
        if len(members) < 2:
            log("ensemble: fewer than 2 finished members; nothing to average")
            return
        total, labels, accs = None, None, []
        for r in members:
            newest = checkpoints(self.task_dir(r["task"]) / "checkpoints")[0]
            try:
                probs, these = member_probabilities(newest)
            except (UserError, JobError) as exc:
                log(f"ensemble: not scored: task {r['task']}: {getattr(exc, 'message', exc)}")
                return
            if labels is not None and (probs.shape != total.shape or not np.array_equal(these, labels)):
                log(f"ensemble: not scored: task {r['task']} is scored on other held-out rows or classes")
                return
            labels = these
            total = probs if total is None else total + probs
            accs.append(float((probs.argmax(axis=1) == labels).mean()))
        accuracy = float((total.argmax(axis=1) == labels).mean())
        log(
            f"ensemble of {len(members)} members: held-out accuracy {100 * accuracy:.2f}% "
            f"(members: {', '.join(f'{100 * a:.2f}%' for a in accs)}; best member {100 * max(accs):.2f}%)"
        )
        summary = {"members": [r["task"] for r in members], "member_accuracy": accs, "accuracy": accuracy}
        _write_json(self.directory / "ensemble.json", summary)


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _toml(values: dict) -> str:
    cfg = from_dict(values, "task")
    saved = parse_toml(cfg.to_toml())
    return "".join(f"{k} = {json.dumps(saved[k])}\n" for k in sorted(values))


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def build_parser(is_root: bool = True) -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m hpcnn.sweep",
        is_root=is_root,
        description="Run the trainings of a sweep file in groups of ranks, handing tasks to free groups.",
    )
    p.add_argument("sweep", metavar="SWEEP.toml")
    p.add_argument("--group-size", type=int, help="ranks per task group (default: the file's, else 1)")
    p.add_argument("--dir", dest="directory", help="output directory (default: the file's, else sweep)")
    p.add_argument("--metric", choices=["accuracy", "loss"], help="sort the summary by this")
    p.add_argument("--ensemble", action=argparse.BooleanOptionalAction, default=None,
                   help="also score the average of the finished members' predictions")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    return p


def _main(comm: Comm, argv) -> int:
    with comm.agreed(comm.debug):
        args = build_parser(is_root=comm.is_root).parse_args(argv)
    sweep = Sweep(comm, args.sweep, args.group_size, args.directory, args.metric, args.ensemble)
    comm.print0(
        f"hpcnn sweep: {len(sweep.tasks)} task(s), {comm.size} rank(s) in groups of {sweep.group_size}, "
        f"into {sweep.directory}"
    )
    code = sweep.run(comm.print0)
    if code == EXIT_PREEMPTED:
        comm.print0(f"hpcnn: sweep stopped by a signal; run the same command again to continue (exit {code})")
    elif code == EXIT_INTERRUPTED:
        comm.print0(
            f"hpcnn: sweep interrupted (Ctrl-C); run the same command again to continue (exit {code})",
            file=sys.stderr,
        )
    return code


def main(argv=None) -> int:
    with EarlySignals():  # a signal during start-up stops the sweep before it takes a task
        return run_command(_main, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
