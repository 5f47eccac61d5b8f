"""``docs/options.md``, made from the ``Config`` fields so that the page cannot drift from the code.

Every training option is a field of ``hpcnn.config.Config`` with its help text, choices and group in
the field's metadata; this module renders them as one table per group. ``tests/test_docs.py``
checks that the committed page equals ``options_markdown()``. After changing a field, regenerate::

    python -m hpcnn.options_doc docs/options.md
"""

import sys
from dataclasses import fields

from hpcnn.config import Config

COMMAND = "python -m hpcnn.options_doc docs/options.md"

# Section titles for the groups of Config's fields; a group not named here is titled by its name.
GROUP_TITLES = {
    "model": "Model",
    "data": "Data",
    "training": "Training",
    "parallel": "Parallel layout",
    "optimizer": "Optimizer and schedule",
    "checkpoint": "Checkpoints",
    "failures": "Failures",
    "run": "Run",
    "output": "Output",
}

INTRO = """\
# Training options

<!-- Generated from hpcnn.config.Config by `{command}`; edit the fields, not this page. -->

`python -m hpcnn.train --help` lists the same options with their defaults. Every option is also a
key of a TOML file given with `--config FILE.toml` (the key is the flag's name with `_` for `-`):
the file overrides the defaults and flags override the file. An unknown key, a wrong type or an
invalid value is an error that names it (exit code 2). The same fields are keyword arguments of
`hpcnn.Trainer` and the `[base]`, `[grid]` and `[[tasks]]` keys of a sweep file
([api.md](api.md), [sweeps.md](sweeps.md)). A yes/no option is a flag (`--drop-last`) with its
negation (`--no-drop-last`); a list is comma-separated (`--hidden 512,256`, `--hidden ""` for
none).

```toml
# run.toml
hidden = [512, 256]
optimizer = "sgd"
lr = 0.05
momentum = 0.9
nesterov = true
lr_schedule = "cosine"
warmup_steps = 100
epochs = 50
```
"""

OUTRO = """\
## Not a config key

`--config FILE.toml` names the file above. `--dry-run` prints the resolved config, which rank holds
which stage and how many rows of each global batch, the parameter count and an estimate of each
rank's memory (parameters, gradients, optimizer state, live activations), then exits without
training.

## Conventions

Those of PyTorch. `--optimizer sgd` is plain SGD unless `--momentum` is given (the default momentum
is 0); SGD momentum has no dampening, `v = mu * v + g`, and Nesterov steps with `g + mu * v`. Adam
adds `weight_decay * p` to the gradient; AdamW shrinks `p` by `1 - lr * weight_decay` (decoupled);
weight decay applies to all parameters. Warm-up ramps linearly to `lr` over `warmup_steps` and
applies to every schedule. Clipping uses the L2 norm of the whole model's gradient. `gelu` is the
exact GELU, `x * Phi(x)` with the normal distribution's `erf`; `gelu_tanh` is its tanh approximation.

Exit codes, and what to do about each: [failures.md](failures.md).
"""


def _shown(value) -> str:
    """A default as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or '""'
    if value == "":
        return '""'
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def options_markdown() -> str:
    """The options page: one table per group of ``Config`` fields, in the fields' order."""
    defaults = Config()
    groups: dict[str, list] = {}
    for f in fields(Config):
        groups.setdefault(f.metadata["group"], []).append(f)
    parts = [INTRO.format(command=COMMAND)]
    for group, members in groups.items():
        rows = ["| option | default | meaning |", "|---|---|---|"]
        for f in members:
            meaning = f.metadata["help"]
            if f.metadata["choices"]:
                meaning += ": " + ", ".join(map(str, f.metadata["choices"]))
            flag = "--" + f.name.replace("_", "-")
            rows.append(f"| `{flag}` | `{_shown(getattr(defaults, f.name))}` | {_cell(meaning)} |")
        parts.append(f"## {GROUP_TITLES.get(group, group.capitalize())}\n\n" + "\n".join(rows) + "\n")
    parts.append(OUTRO)
    return "\n".join(parts)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = options_markdown()
    if not argv:
        sys.stdout.write(text)
        return 0
    with open(argv[0], "w", encoding="utf-8") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
