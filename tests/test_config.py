"""Config: defaults, TOML file, flag overrides, and errors that name the key."""

import pytest

from hpcnn.config import Config, build_parser, resolve
from hpcnn.core.optim import make_optimizer
from hpcnn.errors import UserError


def test_defaults_and_flags():
    cfg = resolve([])
    assert cfg == Config()
    argv = ["--hidden", "32,16", "--lr", "0.5", "--nesterov", "--momentum", "0.9", "--optimizer", "sgd"]
    cfg = resolve([*argv, "--dtype=float64"])
    got = (cfg.hidden, cfg.lr, cfg.nesterov, cfg.momentum, cfg.optimizer, cfg.dtype)
    assert got == ([32, 16], 0.5, True, 0.9, "sgd", "float64")
    assert resolve(["--hidden", ""]).hidden == []


def test_sgd_is_plain_unless_momentum_is_given():
    plain = resolve(["--optimizer", "sgd"])
    assert (
        plain.momentum == 0.0
        and repr(make_optimizer(plain)) == "SGD(momentum=0.0, nesterov=False, weight_decay=0.0)"
    )
    heavy = make_optimizer(resolve(["--optimizer", "sgd", "--momentum", "0.9"]))
    assert heavy.momentum == 0.9 and heavy.state_names() == ["velocity"]


def test_toml_then_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('epochs = 3\nlr = 1\nhidden = [8]\noptimizer = "sgd"\nnesterov = true\nmomentum = 0.9\n')
    cfg = resolve(["--config", str(path), "--epochs", "5"])
    assert (cfg.epochs, cfg.lr, cfg.hidden, cfg.optimizer, cfg.nesterov) == (5, 1.0, [8], "sgd", True)
    assert isinstance(cfg.lr, float)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = resolve(["--hidden", "7,5", "--data", 'we"ird\\path.h5', "--drop-last"])
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert resolve(["--config", str(path)]) == cfg


@pytest.mark.parametrize(
    "text,message",
    [
        ("epoch = 3\n", "unknown key 'epoch'; valid keys: model, hidden, activation"),
        ('epochs = "3"\n', "epochs = '3': expected int"),
        ("hidden = [1.5]\n", "expected a list of integers"),
        ("nesterov = 1\n", "expected bool"),
        ('optimizer = "lamb"\n', "optimizer = 'lamb': expected one of sgd, adam, adamw"),
        ("epochs = [\n", "not valid TOML"),
        ("lr = inf\n", "lr = inf: must be a finite number"),
        ("stall_timeout = nan\n", "stall_timeout = nan: must be a finite number"),
        ("clip_norm = nan\n", "clip_norm = nan: must be a finite number"),
        ("weight_decay = inf\n", "weight_decay = inf: must be a finite number"),
        ("test_fraction = nan\n", "test_fraction = nan: must be a finite number"),
        ("min_lr = -inf\n", "min_lr = -inf: must be a finite number"),
        ("lr = 1" + "0" * 400 + "\n", "lr = 1000000000"),
        ('timeline = "t\\u0000.json"\n', r"timeline = 't\\x00.json': contains a NUL character"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        resolve(["--config", str(path)])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--epochs", "0"], "epochs = 0: must be a positive integer"),
        (["--lr", "-1"], "lr = -1.0: must be > 0"),
        (["--beta2", "1"], "beta2 = 1.0: must be in"),
        (["--hidden", "8,x"], "expected comma-separated integers"),
        (["--optimizer", "lamb"], "invalid choice: 'lamb'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--config", "/nonexistent.toml"], "does not exist"),
        (["--nesterov", "--momentum", "0"], "nesterov needs momentum"),
        (["--momentum", "1"], "momentum = 1.0: must be in"),
        (["--seed", "-1"], "seed = -1: must be >= 0"),
        (["--micro-batches", "0"], "micro_batches = 0: must be a positive integer"),
        (["--pipeline-stages", "-1"], "pipeline_stages = -1: must be a positive integer"),
        (["--schedule", "zb"], "invalid choice: 'zb'"),
        (["--gamma", "-0.5"], "gamma = -0.5: must be > 0"),
        (["--min-lr", "0.1", "--lr", "0.01"], "min_lr = 0.1 is above lr = 0.01"),
        (["--lr", "inf"], "lr = inf: must be a finite number"),
        (["--stall-timeout", "nan"], "stall_timeout = nan: must be a finite number"),
        (["--bucket-mb", "1e400"], "bucket_mb = inf: must be a finite number"),
        (["--gamma", "nan"], "gamma = nan: must be a finite number"),
    ],
)
def test_bad_flags(argv, message):
    with pytest.raises(UserError, match=message):
        resolve(argv)


def test_config_file_that_cannot_be_read_as_toml(tmp_path):
    with pytest.raises(UserError, match=f"config file {tmp_path} is a directory; name a TOML file"):
        resolve(["--config", str(tmp_path)])
    path = tmp_path / "latin1.toml"
    path.write_bytes("hidden = [8] # d\xe9j\xe0 vu\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.toml is not UTF-8 text \(byte 16\), as TOML must be"):
        resolve(["--config", str(path)])


def test_help_names_every_key_and_its_default(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in vars(Config()):
        flag = "--" + name.replace("_", "-")
        assert flag in out, flag
    assert "(default: 256,128)" in out and "(default: digits)" in out and "(default: 0.001)" in out


def test_help_is_silent_off_root(capsys):
    with pytest.raises(SystemExit):
        build_parser(is_root=False).parse_args(["--help"])
    assert capsys.readouterr().out == ""
