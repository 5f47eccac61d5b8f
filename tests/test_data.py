"""Sampler coverage, HDF5 row reading, dataset opening errors and the conversion command."""

import re

import h5py
import numpy as np
import pytest

from hpcnn.config import Config
from hpcnn.data import main
from hpcnn.errors import UserError
from hpcnn.io.datasets import (
    EpochSampler,
    H5Source,
    describe_nonfinite,
    first_nonfinite,
    open_dataset,
    read_rows,
    split_counts,
    synthetic_arrays,
    write_h5,
)


@pytest.mark.parametrize("n", [0, 1, 7, 64, 1437])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_split_counts_tile_exactly_and_differ_by_at_most_one(n, parts):
    slices = [split_counts(n, parts, r) for r in range(parts)]
    assert slices[0][0] == 0 and sum(c for _, c in slices) == n
    assert all(s + c == slices[i + 1][0] for i, (s, c) in enumerate(slices[:-1]))
    assert max(c for _, c in slices) - min(c for _, c in slices) <= 1


SAMPLER_CASES = [
    (n, batch, size)
    for n, batch in [(1438, 64), (100, 10), (7, 3), (37, 37), (10, 64)]
    for size in (1, 2, 3, 4, 8)
    if batch >= size  # smaller global batches are rejected before sampling
]


@pytest.mark.parametrize("n,batch,size", SAMPLER_CASES)
def test_sampler_uses_every_row_exactly_once_per_epoch(n, batch, size):
    ids = np.arange(100, 100 + n)  # row ids need not start at 0
    samplers = [EpochSampler(ids, batch, r, size, seed=3) for r in range(size)]
    for epoch in (0, 1):
        per_rank = [list(s.epoch(epoch)) for s in samplers]
        assert all(len(p) == len(samplers[0]) == -(-n // batch) for p in per_rank)
        used = np.concatenate([i for p in per_rank for i, _ in p])
        assert np.array_equal(np.sort(used), ids)
        serial = list(EpochSampler(ids, batch, 0, 1, seed=3).epoch(epoch))
        for b, (whole, rows) in enumerate(serial):
            # the ranks' slices, in rank order, are the serial batch: the layout does not change batches
            assert np.array_equal(np.concatenate([p[b][0] for p in per_rank]), whole)
            assert all(p[b][1] == rows == len(whole) for p in per_rank)
            counts = [len(p[b][0]) for p in per_rank]
            assert max(counts) - min(counts) <= 1
    orders = [np.concatenate([i for i, _ in EpochSampler(ids, batch, 0, 1, seed=3).epoch(e)]) for e in (0, 1)]
    assert n < 3 or not np.array_equal(*orders), "each epoch draws a new order"


def test_sampler_drop_last():
    s = EpochSampler(np.arange(10), 4, 0, 1, seed=0, drop_last=True)
    batches = list(s.epoch(0))
    assert len(s) == 2 and [len(i) for i, _ in batches] == [4, 4]
    kept = np.concatenate([i for i, _ in batches])
    full = np.concatenate([i for i, _ in EpochSampler(np.arange(10), 4, 0, 1, seed=0).epoch(0)])
    assert np.array_equal(kept, full[:8])  # the same order, the partial batch left out


@pytest.fixture
def h5file(tmp_path):
    x = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)  # row r holds 3r, 3r+1, 3r+2
    y = np.arange(50) % 4
    path = tmp_path / "rows.h5"
    write_h5(path, x, y, x[:5], y[:5], num_classes=4)
    return path, x, y


ID_CASES = [
    [7, 3, 41, 0],
    [10, 11, 12, 13],
    [13, 12, 11, 10],
    [49],
    [],
    list(np.random.default_rng(0).permutation(50)),
]


@pytest.mark.parametrize("ids", ID_CASES)
def test_h5_source_reads_exactly_the_rows_asked_in_that_order(h5file, ids):
    path, x, y = h5file
    with h5py.File(path, "r") as f:
        src = H5Source(f, "x", "y")
        ids = np.array(ids, dtype=np.int64)
        xr, yr = src.read(ids)
        assert np.array_equal(xr, x[ids]) and np.array_equal(yr, y[ids])
        assert xr.shape == (len(ids), 3) and src.rows_read == len(ids)


def test_each_rank_reads_only_its_rows(h5file):
    """Simulated ranks: over an epoch each reads exactly its slices' rows, and the right ones."""
    path, x, y = h5file
    cfg = Config(data=str(path))
    size = 4
    for rank in range(size):
        ds, _ = open_dataset(cfg, rank, size)
        sampler = EpochSampler(ds.train.ids, 12, rank, size, seed=1)
        expected = 0
        for ids, _ in sampler.epoch(0):
            xr, yr = ds.train.source.read(ids)
            assert np.array_equal(xr, x[ids]) and np.array_equal(yr, y[ids])
            expected += len(ids)
        assert (
            ds.train.source.rows_read
            == expected
            == split_counts(12, size, rank)[1] * 4 + split_counts(2, size, rank)[1]
        )
        ds.close()


def test_open_dataset_reads_layout_and_held_out_split(h5file):
    path, _, _ = h5file
    ds, labels = open_dataset(Config(data=str(path)), 0, 1)
    assert (len(ds.train), len(ds.test), ds.features, ds.num_classes) == (50, 5, 3, 4)
    assert labels == (0, 3)  # this rank's label range, checked against num_classes by the caller
    ds.close()


def test_test_fraction_split_is_disjoint_and_fixed(tmp_path):
    path = tmp_path / "plain.h5"
    write_h5(path, np.zeros((40, 2)), np.arange(40) % 2, num_classes=2)
    a, _ = open_dataset(Config(data=str(path), test_fraction=0.25), 0, 1)
    b, _ = open_dataset(Config(data=str(path), test_fraction=0.25, seed=9), 0, 1)
    assert len(a.test) == 10 and len(a.train) == 30
    assert not set(a.test.ids) & set(a.train.ids)
    assert np.array_equal(np.sort(np.r_[a.test.ids, a.train.ids]), np.arange(40))
    assert np.array_equal(a.test.ids, b.test.ids), "the split does not move with the training seed"
    a.close()
    b.close()


def test_class_count_found_from_labels_when_not_recorded(tmp_path):
    path = tmp_path / "noattr.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros((10, 2), np.float32)
        f["y"] = np.array([0, 1, 2, 6, 1, 0, 0, 3, 2, 1])
    ranges = []
    for rank in range(3):
        ds, r = open_dataset(Config(data=str(path)), rank, 3)
        ranges.append(r)
        ds.close()
    assert ranges == [(0, 6), (0, 1), (1, 3)]  # each rank looked at its block of labels only


@pytest.mark.parametrize(
    "make,cfg,message",
    [
        (None, {}, "does not exist"),
        ("text", {}, "not a readable HDF5 file"),
        ("good", {"x_key": "inputs"}, "no dataset 'inputs'"),
        ("floaty", {}, "class labels for cross_entropy are 1-D integers"),
        ("ragged", {}, "same rows"),
        ("good", {"test_fraction": 0.999}, "leaves no training"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, make, cfg, message):
    path = tmp_path / "d.h5"
    if make == "text":
        path.write_text("not hdf5")
    elif make == "good":
        with h5py.File(path, "w") as f:
            f["x"], f["y"] = np.zeros((4, 2)), np.arange(4)
    elif make == "floaty":
        with h5py.File(path, "w") as f:
            f["x"], f["y"] = np.zeros((4, 2)), np.zeros(4)
    elif make == "ragged":
        with h5py.File(path, "w") as f:
            f["x"], f["y"] = np.zeros((4, 2)), np.arange(5)
    with pytest.raises(UserError, match=message):
        open_dataset(Config(data=str(path), **cfg), 0, 1)


def test_empty_held_out_pair_means_no_held_out_set(tmp_path):
    path = tmp_path / "e.h5"
    write_h5(path, np.zeros((8, 2)), np.arange(8) % 2, np.zeros((0, 2)), np.zeros(0, np.int64), num_classes=2)
    ds, _ = open_dataset(Config(data=str(path)), 0, 1)
    assert ds.test is None
    ds.close()


@pytest.mark.parametrize("data", ["digits", "xor", "synthetic", "file-with-held-out"])
def test_test_fraction_is_refused_where_the_split_is_fixed(h5file, data):
    path = str(h5file[0]) if data == "file-with-held-out" else data
    with pytest.raises(UserError, match="test-fraction"):
        open_dataset(Config(data=path, test_fraction=0.2), 0, 1)


def test_unknown_dataset_name_lists_the_built_ins():
    with pytest.raises(UserError, match="digits, xor, synthetic"):
        open_dataset(Config(data="mnist"), 0, 1)


def test_digits_is_shipped_and_complete():
    ds, _ = open_dataset(Config(), 0, 1)
    assert (len(ds.train) + len(ds.test), ds.features, ds.num_classes) == (1797, 64, 10)
    x, y = ds.train.source.read(np.arange(len(ds.train)))
    assert x.min() >= 0.0 and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))
    ds.close()


def test_convert_npz_and_npy(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 2, 3)).astype(np.float32), rng.integers(0, 3, 20)
    np.savez(tmp_path / "a.npz", x=x, y=y, x_test=x[:4], y_test=y[:4])
    assert main(["convert", str(tmp_path / "a.npz"), str(tmp_path / "a.h5")]) == 0
    ds, _ = open_dataset(Config(data=str(tmp_path / "a.h5")), 0, 1)
    assert (len(ds.train), len(ds.test), ds.features) == (20, 4, 6) and ds.num_classes == int(y.max()) + 1
    xr, yr = ds.train.source.read(np.arange(20))
    assert np.array_equal(xr, x.reshape(20, 6)) and np.array_equal(yr, y)
    ds.close()
    np.save(tmp_path / "x.npy", x[:, 0, :])
    np.save(tmp_path / "y.npy", y)
    assert main(["convert", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), str(tmp_path / "b.h5")]) == 0
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert np.array_equal(f["x"][:], x[:, 0, :]) and np.array_equal(f["y"][:], y) and "x_test" not in f
    np.savez(tmp_path / "half.npz", x=x, y=y, x_test=x[:4])
    assert main(["convert", str(tmp_path / "half.npz"), str(tmp_path / "c.h5")]) == 2
    assert "only one of x_test and y_test" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "x.npy"), str(tmp_path / "b2.h5")]) == 2
    assert "one .npz file or two .npy files" in capsys.readouterr().err


def test_synthetic_file_equals_the_in_memory_dataset(tmp_path):
    path = tmp_path / "syn.h5"
    argv = ["synthetic", str(path), "--rows", "70000", "--features", "5", "--classes", "3", "--seed", "4"]
    assert main(argv) == 0
    x, y = synthetic_arrays(70000, 5, 3, 4)  # spans two generation blocks
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["x"][:], x) and np.array_equal(f["y"][:], y)
        assert f["x_test"].shape == (14000, 5) and f.attrs["num_classes"] == 3


def _layout(path, **entries):
    """An HDF5 file of ``entries``: arrays, h5py links, ``"group"`` or ``"attr:NAME"`` values."""
    with h5py.File(path, "w") as f:
        for key, value in entries.items():
            if key.startswith("attr_"):
                f.attrs[key[5:]] = value
            elif isinstance(value, str) and value == "group":
                f.create_group(key)
            else:
                f[key] = value
    return path


X4, Y4 = np.zeros((4, 2), np.float32), np.arange(4) % 2


@pytest.mark.parametrize(
    "entries,message",
    [
        (dict(x="group", y=Y4), r"'x' is a group, not a dataset \(an empty group\)"),
        (dict(x=h5py.SoftLink("/nowhere"), y=Y4), r"'x' is a soft link to '/nowhere', which does not exist"),
        (dict(x=h5py.ExternalLink("gone.h5", "/x"), y=Y4), r"'x' is an external link to '/x' in gone.h5"),
        (dict(x=np.zeros((4, 0)), y=Y4), r"'x' has 0 features per row \(4, 0\)"),
        (dict(x=np.zeros(4), y=Y4), r"'x' must be \(rows, features\)"),
        (dict(x=np.zeros((4, 2, 2, 2, 2)), y=Y4), r"'x' must be \(rows, features\) or images"),
        (dict(x=np.zeros((4, 2, 0, 2)), y=Y4), r"'x' has 0 features per row \(4, 2, 0, 2\)"),
        (dict(x=np.zeros((4, 2), bool), y=Y4), r"'x' holds booleans"),
        (dict(x=np.zeros((4, 2), complex), y=Y4), r"'x' holds complex numbers"),
        (dict(x=np.array([[b"a", b"b"]] * 4), y=Y4), r"'x' holds strings"),
        (dict(x=X4, y=np.array(["a"] * 4, dtype=h5py.string_dtype())), r"'y' holds strings"),
        (dict(x=X4, y=Y4, attr_num_classes=2.5), r"attribute num_classes = 2.5: expected an integer"),
        (dict(x=X4, y=Y4, attr_num_classes="two"), r"attribute num_classes = 'two': expected an integer"),
        (dict(x=X4, y=Y4, attr_num_classes=True), r"attribute num_classes = True: expected an integer"),
        (dict(x=X4, y=Y4, attr_num_classes=[2, 3]), r"attribute num_classes = \[2, 3\]: expected an integer"),
        (dict(x=X4, y=Y4, attr_num_classes=70000), r"70,000 classes \(attribute num_classes\) is more than"),
        (dict(x=X4, y=Y4, x_test=X4, y_test=np.zeros(4)), r"held-out 'y_test' is float64 \(4,\), training"),
    ],
)
def test_bad_layouts_name_the_dataset_and_what_to_change(tmp_path, entries, message):
    path = _layout(tmp_path / "bad.h5", **entries)
    with pytest.raises(UserError, match=message):
        open_dataset(Config(data=str(path)), 0, 1)


def test_datasets_behind_links_or_in_groups_are_read(tmp_path):
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    _layout(tmp_path / "other.h5", x=x)
    link = h5py.ExternalLink("other.h5", "/x")
    path = _layout(tmp_path / "links.h5", x=link, y=Y4, attr_num_classes=np.array([2]))
    with h5py.File(path, "a") as f:
        f["inputs/x"], f["alias"] = x, h5py.SoftLink("/inputs/x")
    for key in ("x", "inputs/x", "alias"):
        ds, _ = open_dataset(Config(data=str(path), x_key=key), 0, 1)
        assert ds.num_classes == 2 and np.array_equal(ds.train.source.read(np.arange(4))[0], x)
        ds.close()


def test_a_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(UserError, match=f"data file {tmp_path / 'd.h5'} is a directory; name an HDF5 file$"):
        (tmp_path / "d.h5").mkdir()
        open_dataset(Config(data=str(tmp_path / "d.h5")), 0, 1)


def test_a_corrupt_chunk_names_the_file_dataset_and_rows(tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros((40, 2), np.float32)
        f.create_dataset("y", data=np.arange(40) % 2, chunks=(8,), compression="gzip")
        info = f["y"].id.get_chunk_info(3)  # rows 24-31
    data = bytearray(path.read_bytes())
    data[info.byte_offset : info.byte_offset + info.size] = bytes(info.size)
    path.write_bytes(bytes(data))
    message = rf"{path}: rows 24-31 of dataset '/y' cannot be read \(.*\): the file is damaged or truncated"
    # the labels are read before training, each rank a block: open_data reports it for all ranks
    for rank, found in [(0, None), (1, message)]:
        ds, _ = open_dataset(Config(data=str(path)), rank, 2)
        assert ds.unreadable is None if found is None else re.match(found, ds.unreadable)
        ds.close()
    with h5py.File(path, "r") as f:
        with pytest.raises(UserError, match=message):
            read_rows(f["y"], slice(0, 40), 0, 40)
        assert np.array_equal(read_rows(f["y"], slice(0, 24), 0, 24), np.arange(24) % 2)


def test_describe_nonfinite_tells_overflow_in_the_cast_from_nan_in_the_file():
    stored = np.array([1.0, 1e39, np.nan])
    seen = np.array([1.0, np.inf, np.nan], np.float32)  # what the cast to float32 gives
    assert describe_nonfinite("x", 5, stored, seen) == (
        "has an input value beyond the range of float32",
        "'x'[5, 1] = 1e+39 (float32 reaches 3.403e+38); rescale the inputs or train with --dtype float64",
    )
    assert describe_nonfinite("y", 2, np.float64("nan"), np.array([np.nan], np.float32), "target") == (
        "has a non-finite target value (NaN or Inf)",
        "'y'[2] = nan",
    )
    assert first_nonfinite(np.ones((3, 2))) is None and first_nonfinite(np.array([[1, 2], [np.inf, 0]])) == 1


def _images(path, x, y, **extra):
    with h5py.File(path, "w") as f:
        f["x"], f["y"] = x, y
        for key, value in extra.items():
            f[key] = value
    return str(path)


def test_image_files_in_either_layout_give_the_same_channels_last_rows(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 3, 4, 5)).astype(np.float32)  # (rows, C, H, W)
    y = np.arange(9) % 3
    nchw = _images(tmp_path / "nchw.h5", x, y, x_test=x[:2], y_test=y[:2])
    nhwc = _images(tmp_path / "nhwc.h5", x.transpose(0, 2, 3, 1), y)
    a, _ = open_dataset(Config(data=nchw), 0, 1)
    b, _ = open_dataset(Config(data=nhwc, image_layout="nhwc"), 0, 1)
    assert a.shape == b.shape == (4, 5, 3) and a.features == b.features == 60 and a.num_classes is None
    ids = np.array([7, 0, 3])  # any order, as the sampler asks
    rows_a, rows_b = a.train.source.read(ids)[0], b.train.source.read(ids)[0]
    np.testing.assert_array_equal(rows_a, x[ids].transpose(0, 2, 3, 1).reshape(3, 60))
    np.testing.assert_array_equal(rows_b, rows_a)
    np.testing.assert_array_equal(
        a.test.source.read(np.array([1]))[0], x[[1]].transpose(0, 2, 3, 1).reshape(1, 60)
    )
    # read as nhwc, the nchw file's rows are images of another shape: what --image-layout decides
    c, _ = open_dataset(Config(data=nchw, image_layout="nhwc"), 0, 1)
    assert c.shape == (3, 4, 5)
    for ds in (a, b, c):
        ds.close()


def test_three_dimensional_inputs_are_one_channel_images(tmp_path):
    x = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)
    ds, _ = open_dataset(Config(data=_images(tmp_path / "gray.h5", x, np.arange(4) % 2)), 0, 1)
    assert ds.shape == (2, 3, 1) and ds.in_shape == (2, 3, 1) and ds.features == 6
    np.testing.assert_array_equal(ds.train.source.read(np.arange(4))[0], x.reshape(4, 6))
    ds.close()


def test_digits_are_one_channel_8x8_images_of_the_flat_rows():
    ds, _ = open_dataset(Config(), 0, 1)
    assert ds.shape == (8, 8, 1) and ds.features == 64
    rows = ds.train.source.read(np.arange(5))[0]
    flat = ds.train.source.x[:5]  # the file's dataset: (rows, 64)
    # one channel: the 8x8 image (H, W, 1), channels last, is the stored row, pixel by pixel
    np.testing.assert_array_equal(rows.reshape(5, 8, 8, 1)[..., 0], flat.reshape(5, 8, 8))
    np.testing.assert_array_equal(rows, flat)
    ds.close()


def test_a_non_finite_value_in_an_image_row_stops_training_naming_the_row(tmp_path):
    from hpcnn import Trainer
    from hpcnn.errors import JobError
    from hpcnn.parallel.comm import Comm

    x = np.ones((8, 2, 2, 2), np.float32)
    x[5, 1, 0, 1] = np.inf
    path = _images(tmp_path / "inf.h5", x, np.arange(8) % 2)
    trainer = Trainer(None, path, comm=Comm.serial(), hidden=[4], batch_size=8, log=None, epochs=1)
    with pytest.raises(JobError, match=r"training row 5 has a non-finite input value .*'x'\[5, 3\] = inf"):
        trainer.fit()


def test_convert_keeps_images_and_they_read_back_as_images(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 1, 3, 4)).astype(np.float32), np.arange(6) % 2
    np.savez(tmp_path / "img.npz", x=x, y=y, x_test=x[:2], y_test=y[:2])
    assert main(["convert", str(tmp_path / "img.npz"), str(tmp_path / "img.h5")]) == 0
    assert "6 rows x images of 1 x 3 x 4" in capsys.readouterr().out
    with h5py.File(tmp_path / "img.h5") as f:
        assert f["x"].shape == (6, 1, 3, 4) and f["x_test"].shape == (2, 1, 3, 4)
    ds, _ = open_dataset(Config(data=str(tmp_path / "img.h5")), 0, 1)
    assert ds.shape == (3, 4, 1)
    np.testing.assert_array_equal(ds.train.source.read(np.arange(6))[0], x.reshape(6, 12))
    ds.close()
    np.savez(tmp_path / "bad.npz", x=x, y=y, x_test=x[:2, :, :2], y_test=y[:2])
    assert main(["convert", str(tmp_path / "bad.npz"), str(tmp_path / "bad.h5")]) == 2
    assert "held-out inputs have rows of shape (1, 2, 4), inputs (1, 3, 4)" in capsys.readouterr().err


def test_synthetic_images_are_the_synthetic_rows_in_memory_and_in_a_file(tmp_path, capsys):
    flat, _ = open_dataset(Config(data="synthetic", synthetic_rows=50, synthetic_features=48), 0, 1)
    img, _ = open_dataset(Config(data="synthetic", synthetic_rows=50, synthetic_image="3x4x4"), 0, 1)
    assert img.shape == (4, 4, 3) and img.features == 48 and flat.shape is None
    ids = np.arange(50)
    np.testing.assert_array_equal(img.train.source.read(ids)[0], flat.train.source.read(ids)[0])
    out = tmp_path / "syn.h5"
    assert main(["synthetic", str(out), "--rows", "50", "--test-rows", "10", "--image", "3x4x4"]) == 0
    assert "50 rows x 3x4x4 images" in capsys.readouterr().out
    with h5py.File(out) as f:
        assert f["x"].shape == (50, 3, 4, 4)
    disk, _ = open_dataset(Config(data=str(out)), 0, 1)
    assert disk.shape == (4, 4, 3)
    np.testing.assert_array_equal(disk.train.source.read(ids)[0], img.train.source.read(ids)[0])
    np.testing.assert_array_equal(
        disk.test.source.read(np.arange(10))[0], img.test.source.read(np.arange(10))[0]
    )
    disk.close()
    assert main(["synthetic", str(out), "--image", "3x4"]) == 2
    assert "--image = '3x4': expected CxHxW" in capsys.readouterr().err


def test_arrays_take_images_in_either_layout():
    from hpcnn.io.datasets import arrays

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 2, 3, 3)), np.arange(5) % 2
    a = arrays(x, y, x[:2], y[:2])
    b = arrays(x.transpose(0, 2, 3, 1), y, image_layout="nhwc")
    c = arrays(x[:, 0], y)
    assert a.shape == b.shape == (3, 3, 2) and c.shape == (3, 3, 1)
    np.testing.assert_array_equal(a.train.source.x, b.train.source.x)
    np.testing.assert_array_equal(a.test.source.x, a.train.source.x[:2])
    with pytest.raises(UserError, match=r"x_test has rows of shape \(3, 3\), x \(2, 3, 3\)"):
        arrays(x, y, x[:2, 0], y[:2])
    with pytest.raises(UserError, match=r"image_layout = 'chw': expected nchw or nhwc"):
        arrays(x, y, image_layout="chw")
    with pytest.raises(UserError, match=r"inputs are \(rows, features\) or images"):
        arrays(x[..., None], y)
