"""Reading a checkpoint: what it holds (``inspect``) and a stage's tensors (``read_stage``).

Any error while reading a damaged file, opening, reading or closing it, is a ``UserError``
naming the file (``open_checkpoint``): what h5py, numpy and json raise on damage (``DAMAGE``)
means "corrupt", never an internal error. A file that is not an hpcnn checkpoint, or one of a
format this hpcnn does not read (``READS``), is refused by name. Nothing here checks the digests:
``verify`` does (``verification``), and whoever must not hang on a damaged file verifies it first.
"""

import json
import math
from contextlib import contextmanager

from hpcnn import __version__
from hpcnn.errors import UserError
from hpcnn.io.checkpoints.fileformat import KIND, READS, STATE, Info, Position, group_tensors
from hpcnn.io.datasets.layout import open_h5

# What reading a damaged file can raise from h5py, numpy and json (UnicodeDecodeError and
# JSONDecodeError are ValueErrors): each means "corrupt", never an internal error.
DAMAGE = (
    OSError,
    RuntimeError,
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    ArithmeticError,
    MemoryError,
)


@contextmanager
def open_checkpoint(path):
    """``path`` open for reading. Any error a damaged file raises, opening, reading or closing it,
    becomes a ``UserError`` naming the file."""
    try:
        f = open_h5(path, "checkpoint")
    except DAMAGE as exc:  # open_h5 turns OSErrors into UserErrors; a damaged superblock can raise others
        raise UserError(f"checkpoint {path} is not a readable HDF5 file ({exc})") from None
    try:
        with f:
            yield f
    except UserError:
        raise
    except DAMAGE as exc:
        raise UserError(f"checkpoint {path} is corrupt ({damage_reason(exc)})") from None


def damage_reason(exc: BaseException) -> str:
    # h5py raises KeyError for an object it cannot open; str() of a KeyError quotes its message.
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return f"{type(exc).__name__}: {text}"


def attr_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def inspect(path) -> Info:
    """Read what a checkpoint holds (attributes only); ``UserError`` if it is not one hpcnn reads
    or cannot be decoded. The attributes are not checked against their digest: ``verify`` does."""
    with open_checkpoint(path) as f:
        return info_of(path, f, checked_version(path, f))


def info_of(path, f, version: int) -> Info:
    """``inspect`` of the open checkpoint ``f`` (of ``version``)."""
    m, o, p, layout = f["model"].attrs, f["optimizer"].attrs, f["position"].attrs, f["layout"].attrs
    return Info(
        path=str(path),
        format_version=version,
        hpcnn_version=attr_text(f.attrs["hpcnn_version"]),
        created=attr_text(f.attrs["created"]),
        config=attr_text(f.attrs["config"]),
        architecture=json.loads(attr_text(m["architecture"])),
        description=attr_text(m["description"]),
        parameters=int(m["parameters"]),
        optimizer=attr_text(o["kind"]),
        optimizer_t=int(o["t"]),
        state_names=json.loads(attr_text(o["state"])),
        position=Position(
            int(p["step"]),
            int(p["epoch"]),
            int(p["batch"]),
            [float(v) for v in p["epoch_sums"]],
            json.loads(attr_text(p["history"])),
            json.loads(attr_text(p["privacy"])) if "privacy" in p else None,
        ),
        seed=int(f["rng"].attrs["seed"]),
        layout={k: attr_text(v) if isinstance(v, (bytes, str)) else v.tolist() for k, v in layout.items()},
        layer_state=int(m.get("state", 0)),
    )


def checked_version(path, f) -> int:
    """The format version of an hpcnn checkpoint this hpcnn reads; ``UserError`` for other files."""
    if attr_text(f.attrs.get("kind", "")) != KIND:
        raise UserError(f"{path} is not an hpcnn checkpoint (no kind = {KIND!r} attribute)")
    version = int(f.attrs.get("format_version", -1))
    if version not in READS:
        raise UserError(
            f"checkpoint {path} has format_version {version}; this hpcnn {__version__} reads "
            f"format_version {' and '.join(map(str, READS))}"
        )
    return version


def read_stage(path, layers, first: int, stop: int, params, state: dict, state_lo: int = 0) -> None:
    """Fill this stage's flat parameter, layer-state (``params.state``) and optimizer-state buffers
    from ``path``. The optimizer's buffers may hold a part of the stage's flat buffer, from element
    ``state_lo`` (``--zero``: each replica reads its part of every tensor)."""
    targets = [("model", params.data, 0), (STATE, params.state, 0)]
    targets += [(f"optimizer/{n}", state[n], state_lo) for n in sorted(state)]
    with open_checkpoint(path) as f:
        for group, flat, lo in targets:
            for key, offset, shape in group_tensors(group, layers, first, stop):
                a, z = max(offset, lo), min(offset + math.prod(shape), lo + len(flat))
                if z <= a:  # (a part of the buffer without this tensor)
                    continue
                name = f"{group}/{key}"
                if name not in f:
                    raise UserError(f"checkpoint {path} has no dataset {name}")
                dset = f[name]
                if tuple(dset.shape) != shape:
                    raise UserError(f"checkpoint {path}: {name} has shape {dset.shape}, expected {shape}")
                try:
                    values = dset[...]
                except DAMAGE as exc:
                    raise UserError(f"checkpoint {path}: dataset {name} is corrupt ({exc})") from None
                flat[a - lo : z - lo] = values.reshape(-1)[a - offset : z - offset]
