"""The checkpoint file: its names, its layout, the values it holds and their digests.

Layout of ``ckpt-<step>.h5`` (``format_version`` 2)::

    /                      attrs: format_version, kind = "hpcnn checkpoint", hpcnn_version, created,
                                  config (the resolved config as TOML),
                                  tensor_digests (JSON: dataset name -> sha256 of its dtype, shape, bytes),
                                  content_digest (sha256 of every other attribute, canonical JSON)
    /model                 attrs: architecture (JSON: in_features, in_shape, dtype, one spec per layer),
                                  description, parameters, state (values of layer state; only
                                  where layers keep state)
    /model/<LLL>_<type>/<name>          parameters of layer LLL (model order), e.g. 000_dense/W
    /optimizer             attrs: kind, t (optimizer steps taken), state (JSON list of names)
    /optimizer/<state>/<LLL>_<type>/<name>   e.g. optimizer/m/000_dense/W (Adam), velocity (SGD)
    /state/<LLL>_<type>/<name>          layer state (not parameters), e.g. state/001_batchnorm/mean;
                                        only in checkpoints of models whose layers keep state
    /position              attrs: step, epoch, batch (global batches of ``epoch`` done),
                                  epoch_sums (loss sum, correct, rows of that epoch so far),
                                  history (JSON: one row per finished epoch),
                                  privacy (JSON, private runs only: accountant, delta and
                                  the (sampling rate, noise multiplier, steps) segments)
    /rng                   attrs: seed, data_order: what the data order is derived from
    /layout                attrs: ranks, replicas, stages, stage_bounds, micro_batches, schedule,
                                  io ("mpio" or "gather"); for information only

Tensors are stored whole (layout-free): a rank reads the tensors of its own stage, whatever
layout wrote them (``stage_tensors`` names them and places them in a stage's flat buffer). Layer
state (``Layer.state_specs``: ``BatchNorm``'s running statistics) is stored and read the same way
from the stage's state buffer (``FlatParams.state``); a checkpoint without a ``state`` group (one
written before layers kept state) loads into a model whose layers keep none.

Integrity. Every byte of content is covered by a checksum: each dataset by HDF5's Fletcher32
filter (per chunk, checked on every read) and by its sha256 in ``tensor_digests``; every attribute,
``tensor_digests`` included, by ``content_digest``. The digests are computed from the values
before writing (so both writers store the same ones) and recomputed from the file by ``verify``
(``verification``). The file is written in the HDF5 1.10 format (``LIBVER``): its superblock,
object headers and chunk indexes carry HDF5's own checksums, and strings are fixed-length, stored
in the checksummed object headers rather than in the global heap, which has no checksum and on
whose damage HDF5 can loop forever (2 of 5,000 random bit flips in a format 1 file's metadata
did). Format 1 files (hpcnn before the digests) still load: their tensors are checked by
Fletcher32, their attributes only decoded.

Training draws no random numbers from a generator with state: the data order of epoch ``e`` is the
permutation drawn from ``(seed, e)`` (``hpcnn.io.datasets.EpochSampler``) and ``Dropout``'s masks
are drawn from ``(seed, step, layer, row)`` (``hpcnn.core.dropout``), so ``(seed, epoch, batch)``
and the step are the whole random state, and resuming continues on exactly the global batches
(and masks) of an uninterrupted run.
"""

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcnn import __version__
from hpcnn.core.layers import current_spec
from hpcnn.core.model import as_shape, describe
from hpcnn.core.params import layout

FORMAT_VERSION = 2
READS = (1, 2)  # format 1: as 2 without the digests, HDF5's default (1.8) format, vlen strings
LIBVER = ("v110", "v110")  # metadata checksums; readable by HDF5 1.10 and later
KIND = "hpcnn checkpoint"
NAME = re.compile(r"^ckpt-(\d+)\.h5$")
DATA_ORDER = "permutation of the training rows from numpy.random.default_rng((seed, 0xDA7A, epoch))"


# --- files ------------------------------------------------------------------------------------


def file_name(step: int) -> str:
    return f"ckpt-{step:09d}.h5"


def step_of(path) -> int:
    return int(NAME.match(Path(path).name).group(1))


def checkpoints(directory) -> list[Path]:
    """The checkpoints in ``directory``, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


# --- what a checkpoint holds ------------------------------------------------------------------


@dataclass
class Position:
    """Where training stands: what a resumed run needs besides the tensors."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # global batches of ``epoch`` done
    epoch_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, correct, rows
    history: list = field(default_factory=list)  # one dict per finished epoch
    privacy: dict | None = None  # --dp-sgd: the accountant's state (``hpcnn.training.privacy``)


@dataclass
class Info:
    """What a checkpoint holds, read from its attributes (no tensors)."""

    path: str
    format_version: int
    hpcnn_version: str
    created: str
    config: str  # TOML
    architecture: dict
    description: str
    parameters: int
    optimizer: str
    optimizer_t: int
    state_names: list
    position: Position
    seed: int
    layout: dict
    layer_state: int = 0  # values of layer state (``state`` group); 0: none


# --- tensors and the architecture -------------------------------------------------------------


def layer_key(index: int, layer) -> str:
    return f"{index:03d}_{type(layer).__name__.lower()}"


STATE = "state"  # the group of the layers' state tensors


def stage_tensors(layers, first: int, stop: int, state: bool = False):
    """``(key, offset, shape)`` of each tensor of layers ``[first, stop)`` in model order, with its
    offset in the stage's flat buffer (``params.layout``) and keys named by global layer index;
    ``state``: the layers' state tensors (``FlatParams.state``) instead of their parameters."""
    return [
        (f"{layer_key(first + s.layer, layers[first + s.layer])}/{s.name}", s.offset, tuple(s.shape))
        for s in layout(layers[first:stop], state)
    ]


def group_tensors(group: str, layers, first: int, stop: int):
    """``stage_tensors`` of the buffer stored under ``group`` (``state``, or parameter-shaped)."""
    return stage_tensors(layers, first, stop, state=group == STATE)


def keeps_state(layers) -> bool:
    """Whether any layer keeps state (then checkpoints have a ``state`` group)."""
    return any(layer.state_specs() for layer in layers)


def architecture(layers, in_shape, dtype: str) -> dict:
    """The model as data: input row shape (``in_features`` = its size), dtype and layer specs."""
    shape = as_shape(in_shape)
    return {
        "in_features": math.prod(shape), "in_shape": list(shape), "dtype": dtype,
        "layers": [layer.spec() for layer in layers],
    }  # fmt: skip


def in_shape_of(arch: dict) -> tuple:
    """The input row shape of a stored architecture (before images: ``(in_features,)``)."""
    return tuple(arch.get("in_shape") or (arch["in_features"],))


def architecture_difference(saved: dict, current: dict) -> str | None:
    """A sentence naming the first difference between two architectures, or ``None``."""
    if saved["dtype"] != current["dtype"]:
        return f"the checkpoint's dtype is {saved['dtype']}, this run's is {current['dtype']}"
    was, now = in_shape_of(saved), in_shape_of(current)
    # Flat rows and images of as many values are the same rows to a model that takes flat rows
    # (Dense flattens): a checkpoint from before digits were images resumes on them.
    if was != now and not (1 in (len(was), len(now)) and math.prod(was) == math.prod(now)):
        if len(was) == len(now) == 1:
            return f"the checkpoint's model takes {was[0]} input features, this run's data has {now[0]}"
        return f"the checkpoint's model takes rows of shape {was}, this run's data has {now}"
    # (a checkpoint's specs as this hpcnn writes them: one from before a layer argument existed
    # gets the value that computes what it computed then)
    a, b = [current_spec(s) for s in saved["layers"]], current["layers"]
    # Shapes and types first (the difference a user made), then details such as initialisation.
    for detail in (False, True):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            was, now = _spec_text(x, detail), _spec_text(y, detail)
            if was != now:
                return f"layer {i} is {was} in the checkpoint, {now} in this run"
        if len(a) != len(b):
            return f"the checkpoint's model has {len(a)} layers, this run's has {len(b)}"
    return None


def _spec_text(spec: dict, detail: bool = True) -> str:
    shown = [(k, v) for k, v in spec.items() if k != "type" and (detail or k != "init")]
    args = ", ".join(str(v) if k in ("fan_in", "fan_out") else f"{k}={v}" for k, v in shown)
    return f"{spec['type']}({args})" if args else spec["type"]


# --- digests and attributes -------------------------------------------------------------------


def tensor_digest(values) -> str:
    """sha256 of a tensor's dtype, shape and bytes (C order)."""
    h = tensor_hash(values.dtype, values.shape)
    h.update(np.ascontiguousarray(values).data)
    return h.hexdigest()


def tensor_hash(dtype, shape):
    return hashlib.sha256(json.dumps([np.dtype(dtype).str, [int(n) for n in shape]]).encode())


def content_digest(attributes: dict) -> str:
    """sha256 of every attribute (``{object path: {name: value}}``, the root's path being ``/``)
    but ``/``'s ``content_digest`` itself, in a canonical JSON form."""
    plain = {
        where: {name: _plain(v) for name, v in attrs.items() if (where, name) != ("/", "content_digest")}
        for where, attrs in attributes.items()
    }
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def _plain(value):
    """An attribute value as written (str, int, numpy array) or as read back (bytes for a
    fixed-length string, numpy scalars) in one JSON form; arrays by dtype, shape and bytes."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return {"dtype": value.dtype.str, "shape": list(value.shape), "bytes": value.tobytes().hex()}
    raise TypeError(f"an attribute value of type {type(value).__name__}")


def metadata(cfg, layers, in_shape, bounds, grid, opt, position: Position, io: str, digests: dict) -> dict:
    """The attributes of a checkpoint, grouped by HDF5 group (identical on every rank), sealed by
    ``content_digest``; ``digests`` are the tensors' (``tensor_digest``) by dataset name."""
    arch = architecture(layers, in_shape, cfg.dtype)
    meta = {
        "/": {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "hpcnn_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": cfg.to_toml(),
            "tensor_digests": json.dumps(digests, sort_keys=True),
        },
        "model": {
            "architecture": json.dumps(arch),
            "description": describe(layers),
            "parameters": sum(math.prod(s.shape) for layer in layers for s in layer.param_specs()),
        },
        "optimizer": {"kind": cfg.optimizer, "t": opt.t, "state": json.dumps(sorted(opt.state))},
        "position": {
            "step": position.step,
            "epoch": position.epoch,
            "batch": position.batch,
            "epoch_sums": np.asarray(position.epoch_sums, np.float64),
            "history": json.dumps(position.history),
            **({"privacy": json.dumps(position.privacy)} if position.privacy else {}),
        },
        "rng": {"seed": cfg.seed, "data_order": DATA_ORDER},
        "layout": {
            "ranks": grid.world.size,
            "replicas": grid.replicas,
            "stages": grid.stages,
            "stage_bounds": np.asarray(bounds, np.int64),
            "micro_batches": cfg.micro_batches,
            "schedule": cfg.schedule,
            "io": io,
        },
    }
    if keeps_state(layers):
        meta["model"]["state"] = sum(math.prod(s.shape) for layer in layers for s in layer.state_specs())
    meta["/"]["content_digest"] = content_digest(meta)
    return meta
