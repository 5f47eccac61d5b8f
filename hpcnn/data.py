"""``python -m hpcnn.data``: write datasets in the HDF5 layout hpcnn reads (``convert``,
``synthetic``). The layout and the readers are ``hpcnn.io.datasets``."""

import argparse
import math
import sys

from hpcnn.config import chw_shape
from hpcnn.errors import UserError
from hpcnn.io.datasets import convert, write_synthetic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hpcnn.data", description="Write datasets in the HDF5 layout hpcnn reads."
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "convert",
        help="convert .npz (x, y[, x_test, y_test]) or two .npy files to HDF5 (x: (rows, features) or images "
        "(rows, C, H, W), (rows, H, W, C), (rows, H, W), written as they are)",
    )
    c.add_argument("inputs", nargs="+", help="one .npz, or inputs.npy labels.npy")
    c.add_argument("out", help="output .h5 file")
    c.add_argument("--x-key", default="x", help="inputs array in the .npz (default: x)")
    c.add_argument("--y-key", default="y", help="labels array in the .npz (default: y)")
    s = sub.add_parser("synthetic", help="write a seeded synthetic classification dataset")
    s.add_argument("out", help="output .h5 file")
    s.add_argument("--rows", type=int, default=100_000, help="training rows (default: 100000)")
    s.add_argument("--features", type=int, default=784, help="features per row (default: 784)")
    s.add_argument("--classes", type=int, default=10, help="classes (default: 10)")
    s.add_argument("--test-rows", type=int, default=None, help="held-out rows (default: rows // 5)")
    s.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    s.add_argument(
        "--image",
        metavar="CxHxW",
        help="write images (rows, C, H, W) of this shape, such as 3x32x32, instead of --features: "
        "the rows of --data synthetic --synthetic-image CxHxW",
    )
    args = p.parse_args(argv)
    try:
        if args.command == "convert":
            print(convert(args.inputs, args.out, args.x_key, args.y_key))
        else:
            test_rows = args.rows // 5 if args.test_rows is None else args.test_rows
            image = None if args.image is None else chw_shape(args.image, "--image")
            features = args.features if image is None else math.prod(image)
            write_synthetic(args.out, args.rows, test_rows, features, args.classes, args.seed, image)
            rows = f"{features} features" if image is None else f"{args.image} images (CxHxW)"
            held_out = f"{test_rows} held-out rows"
            print(f"wrote {args.out}: {args.rows} rows x {rows}, {args.classes} classes, {held_out}")
    except UserError as exc:
        print(f"hpcnn.data: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
