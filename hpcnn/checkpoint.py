"""``python -m hpcnn.checkpoint``: what a checkpoint holds, and which files of a directory are good.

The file format, the writers and the bounded verification are ``hpcnn.io.checkpoints``; this is
the command's face (argv, printing, exit codes)."""

import argparse
import sys

from hpcnn.errors import UserError
from hpcnn.io.checkpoints import (
    DAMAGE,
    KIND,
    VERIFY_STALL_S,
    Info,
    checkpoints,
    damage_reason,
    in_shape_of,
    inspect,
    step_of,
    verify_bounded,
)


def _inputs(shape: tuple) -> str:
    if len(shape) == 3:  # (H, W, C)
        return f"input {shape[0]}x{shape[1]} images with {shape[2]} channel(s)"
    return f"{shape[0]} input features"


def privacy_line(state: dict) -> str:
    """What a private run's checkpoint has spent (its accountant recomputed from the segments)."""
    from hpcnn.training.privacy import Accountant

    spent = Accountant.from_state(state)
    sigmas = ", ".join(f"{sigma:.4g} x {steps} steps at q = {q:.4g}" for q, sigma, steps in spent.segments)
    return (
        f"privacy: epsilon {spent.epsilon():.4g} at delta {spent.delta:g} ({spent.kind} accountant) after "
        f"{spent.steps} private steps; noise multiplier {sigmas}"
    )


def describe_info(info: Info, verified_bytes: int | None) -> str:
    at, layout, arch = info.position, info.layout, info.architecture
    lines = [
        f"{info.path}: {KIND}, format_version {info.format_version}, hpcnn {info.hpcnn_version}, "
        f"{info.created}",
        f"model: {info.description}, {arch['dtype']}, {_inputs(in_shape_of(arch))}",
        f"optimizer: {info.optimizer}, {info.optimizer_t} steps taken, "
        f"state {', '.join(info.state_names) or '-'}",
        *(
            [f"layer state: {info.layer_state} values (running statistics; not trained)"]
            if info.layer_state
            else []
        ),
        f"position: step {at.step}: {at.epoch} epoch(s) and {at.batch} batch(es) done; "
        f"data order from seed {info.seed}",
        f"written by {layout['ranks']} rank(s): {layout['replicas']} replica(s) x {layout['stages']} "
        f"stage(s), stage bounds {layout['stage_bounds']}, {layout['io']} writer",
    ]
    if at.privacy:
        lines.append(privacy_line(at.privacy))
    if at.history:
        last = at.history[-1]
        text = f"last finished epoch {last['epoch']}: loss {last['loss']:.4f}"
        if last.get("test"):
            text += f", held-out loss {last['test']['loss']:.4f}"
            if last["test"].get("accuracy") is not None:
                text += f", accuracy {100 * last['test']['accuracy']:.2f}%"
        lines.append(text)
    if verified_bytes is not None:
        attrs = "every attribute verified" if info.format_version >= 2 else "attributes carry none (format 1)"
        lines.append(
            f"checksums: every dataset verified ({verified_bytes / 2**20:.2f} MiB of tensors), {attrs}"
        )
    elif info.format_version >= 2:
        lines.append("checksums: every attribute verified; tensors not read (--no-verify)")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m hpcnn.checkpoint",
        description="Inspect hpcnn checkpoints. Each file is verified in a child process, stopped "
        "when it shows no progress for --timeout seconds (the file then counts as corrupt).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    info_p = sub.add_parser("info", help="what a checkpoint holds; verifies every checksum")
    info_p.add_argument("file")
    info_p.add_argument("--no-verify", action="store_true", help="check the attributes only, not the tensors")
    info_p.add_argument("--config", action="store_true", help="also print the run's config (TOML)")
    list_p = sub.add_parser(
        "list",
        help="the checkpoints of a directory, newest first, good or UNREADABLE (exit code 2 if any is)",
    )
    list_p.add_argument("directory")
    for sp in (info_p, list_p):
        sp.add_argument(
            "--timeout",
            type=float,
            default=VERIFY_STALL_S,
            metavar="SECONDS",
            help=f"stop a verification that shows no progress this long (default {VERIFY_STALL_S:g})",
        )
    args = p.parse_args(argv)
    if not args.timeout > 0:
        p.error(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    try:
        if args.command == "info":
            verified = verify_bounded(args.file, not args.no_verify, args.timeout)
            info = inspect(args.file)  # safe: the child has just read the same attributes
            try:
                print(describe_info(info, None if args.no_verify else verified))
            except DAMAGE as exc:  # format 1 attributes have no checksum: a damaged one may not decode
                raise UserError(f"checkpoint {args.file} is corrupt ({damage_reason(exc)})") from None
            if args.config:
                print(info.config, end="")
            return 0
        found = checkpoints(args.directory)
        if not found:
            print(f"{args.directory}: no checkpoints")
        bad = 0
        for path in found:
            try:
                verify_bounded(path, stall=args.timeout)
                note = "" if inspect(path).format_version >= 2 else " (format 1: attributes unchecked)"
                print(f"{path}: step {step_of(path)}, good{note}", flush=True)
            except UserError as exc:
                bad += 1
                print(f"{path}: step {step_of(path)}, UNREADABLE: {exc}", flush=True)
        return 2 if bad else 0
    except UserError as exc:
        print(f"hpcnn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
