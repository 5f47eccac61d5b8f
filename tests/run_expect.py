"""Run a command, pass its output through, and fail unless it exits 0 *and* prints a given pattern.

Used by CTest (see CMakeLists.txt) for end-to-end smoke tests, because CTest's
PASS_REGULAR_EXPRESSION ignores the exit code::

    python tests/run_expect.py --expect "final held-out loss" -- mpiexec -n 8 python -m hpcnn.train

Not a pytest module (its name does not start with ``test_``).
"""

import argparse
import re
import subprocess
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--expect",
        action="append",
        required=True,
        metavar="REGEX",
        help="a regular expression the combined stdout/stderr must match (repeatable)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    print("run_expect: " + " ".join(command), flush=True)
    try:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as exc:
        print(f"run_expect: FAIL: cannot start {command[0]}: {exc}", flush=True)
        return 1
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:  # stream it, so a run killed by CTest's TIMEOUT still shows its output
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    code = proc.wait()
    output = "".join(lines)
    missing = [pattern for pattern in args.expect if not re.search(pattern, output)]
    if code != 0:
        print(f"run_expect: FAIL: exit status {code}", flush=True)
    for pattern in missing:
        print(f"run_expect: FAIL: output does not match {pattern!r}", flush=True)
    return 1 if code != 0 or missing else 0


if __name__ == "__main__":
    sys.exit(main())
