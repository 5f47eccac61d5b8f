"""Per-rank spans of a training run, written as a Chrome trace-event file (``--timeline FILE.json``).

Open the file in https://ui.perfetto.dev or chrome://tracing: one process per rank, each with two
tracks, ``compute`` (data, forward and backward per micro-batch, optimizer, evaluation, checkpoint
writes, waits for pipeline receives and sends, the stop check between steps) and ``communication``
(each gradient bucket's ``Iallreduce`` from the moment it starts to the moment the wait for it
returns: the part that overlaps ``compute`` is hidden, the rest is the exposed reduction). Waiting
for a communication shows on ``compute`` as ``reduce wait`` / ``recv wait`` / ``send wait``.

The training's probe (``hpcnn.parallel.probe``) records one span per phase of a step; recording
appends one tuple per span to a list, and with the option off the probe checks one attribute for
``None`` and does nothing else. Times are ``MPI.Wtime`` relative to a barrier at the
start, so the ranks' tracks line up to within the barrier's skew. At the end rank 0 gathers every
rank's spans and writes the file.
"""

import json
from pathlib import Path

COMPUTE, COMMUNICATION = 0, 1
_TRACKS = {COMPUTE: "compute", COMMUNICATION: "communication"}


class Timeline:
    """This rank's spans; ``clock`` gives seconds (``MPI.Wtime``)."""

    def __init__(self, comm, clock):
        self.comm, self.clock = comm, clock
        comm.Barrier()
        self.t0 = clock()
        self.spans = []  # (name, track, start, end, args)

    def span(self, name: str, start: float, end: float, track: int = COMPUTE, **args) -> None:
        self.spans.append((name, track, start - self.t0, end - self.t0, args))

    def write(self, path) -> None:
        """Collective over ``comm``: rank 0 writes every rank's spans to ``path``."""
        every = self.comm.gather(self.spans)
        if not self.comm.is_root:
            return
        events = []
        for rank, spans in enumerate(every):
            events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
            events.append(
                {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}}
            )
            for tid, name in _TRACKS.items():
                events.append(
                    {"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}}
                )
            for name, track, start, end, args in spans:
                event = {"name": name, "cat": _TRACKS[track], "ph": "X", "pid": rank, "tid": track,
                         "ts": round(start * 1e6, 3),
                         "dur": round(max(end - start, 0.0) * 1e6, 3)}  # fmt: skip
                if args:
                    event["args"] = args
                events.append(event)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
        tmp.replace(path)
