"""What plugs into train_gpt.py: technique modules beyond the record, harness.py, and the command
line built from their hyperparameters.

A technique (aurora_variants.py, lineage.py, frontier.py) defines one object with `name` (its
file), `used(hp)`, and any of: Hyperparameters (a dataclass: its fields become flags), PRESETS,
GPU_PRESETS, CHOICES, preset_overrides, check, and train_gpt.py's named points (setup, model_built,
init_weights, make_adam, make_aurora, optimizers_built, lr_at, momentum_at, is_val_step,
trial_started, before_step, after_step, validating, val_readout, checkpoint_state,
load_checkpoint_state; one that returns a value returns None to leave the record's). A log's code
part inlines only the technique modules its run uses and what they import (the others' imports
become `NAME = None`); harness.py, which drives the run from outside, never.
"""
import argparse
import dataclasses
import importlib
import os
import sys

from aurora_variants import VARIANTS  # a technique (inlined in a code part only when used)
from frontier import FRONTIER  # a technique (inlined in a code part only when used)
from lineage import LINEAGE  # a technique (inlined in a code part only when used)

TECHNIQUES = [t for t in (VARIANTS, FRONTIER, LINEAGE) if t]  # a technique's choices before those it builds on
harness = (importlib.import_module("harness")
           if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")) else None)


def with_plugins(cls, presets, choices, gpu_presets):
    """cls with the techniques' and the harness's fields added (a technique's carry its used(): a
    log lists them only when the run uses it); their presets and choices added in place."""
    parts = [part for part in TECHNIQUES + [harness] if hasattr(part, "Hyperparameters")]
    for part in TECHNIQUES:
        presets.update(getattr(part, "PRESETS", {}))
        gpu_presets += getattr(part, "GPU_PRESETS", ())
        for name, allowed in getattr(part, "CHOICES", {}).items():
            choices[name] = choices.get(name, ()) + allowed
    extra = [(f.name, f.type, dataclasses.field(default=f.default, metadata=dict(f.metadata, used=getattr(
        part, "used", None)))) for part in parts for f in dataclasses.fields(part.Hyperparameters)]
    merged = dataclasses.make_dataclass(cls.__name__, extra, bases=(cls,))
    merged.__module__ = cls.__module__  # where pickle finds it
    return merged


def techniques(hp):
    """The techniques this run uses."""
    return [t for t in TECHNIQUES if t.used(hp)]


def call(parts, point, *args):
    """Call the named point `point` of each part that has it."""
    for part in parts:
        if hasattr(part, point):
            getattr(part, point)(*args)


def choice(hp, point, *args):
    """The first value a technique this run uses gives at the named point `point`, or None."""
    for t in techniques(hp):
        value = getattr(t, point)(*args) if hasattr(t, point) else None
        if value is not None:
            return value
    return None


def parse_flags(cls, presets, choices, argv=None):
    """(an instance of `cls`, dry_run) from the command line: one flag per field, the preset's
    overrides under the flags, then harness.py's checks (a ValueError: exit status 2)."""
    ap = argparse.ArgumentParser(allow_abbrev=False,  # run.sh must see the same flag names
                                 description="Train GPT with Aurora (default: the 3175-step record). "
                                 "Defaults are the record's (or the chosen preset's).")
    ap.add_argument("--dry-run", action="store_true", help="check the flags and the configuration "
                    "(world size from $WORLD_SIZE, default 1) and exit; touches no data or records")
    fields = dataclasses.fields(cls)
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        kw = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default {f.default})")
        if f.type is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type is tuple:  # a list of steps, or a fixed number of floats
            ap.add_argument(flag, type=float if f.default or "nargs" in f.metadata else int,
                            nargs=f.metadata.get("nargs", len(f.default or ()) or "*"), **kw)
        else:
            ap.add_argument(flag, type=f.type, choices=choices.get(f.name), **kw)
    for arg in (sys.argv[1:] if argv is None else argv) if harness else ():
        if arg.split("=", 1)[0] in harness.REFUSED_FLAGS:  # a flag left out on purpose: say why
            ap.error(harness.REFUSED_FLAGS[arg.split("=", 1)[0]])
    args = vars(ap.parse_args(argv))
    dry_run = args.pop("dry_run")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        overrides = preset_overrides(args.get("preset", "record"), args, presets, cls.train_steps)
        hp = cls(**{**{k: v for k, v in overrides.items() if k in {f.name for f in fields}}, **args})
        if harness:
            harness.check_hyperparameters(hp, choices, techniques(hp), frozenset(args))
    except ValueError as e:
        ap.error(str(e))
    return hp, dry_run


def preset_overrides(name, flags, presets, train_steps):
    """The overrides of --preset `name` (several joined by +: later ones win)."""
    parts, merged = name.split("+"), {}
    for part in parts:
        if part not in presets:
            raise ValueError(f"--preset: invalid choice: {part!r} (choose from {', '.join(presets)}, "
                             "or several joined by +)")
        merged.update(presets[part])
    for t in TECHNIQUES:
        if hasattr(t, "preset_overrides"):
            merged = t.preset_overrides(parts, merged, flags, train_steps)
    return merged
