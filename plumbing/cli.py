"""Command line: each stage keeps its settings in one Args dataclass, made into argparse flags."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import re
import sys
import types
import typing
from pathlib import Path


class DataError(ValueError):
    """Bad input: the message names the file and line, or the flag, at fault; printed as a line."""


def arg(default, help: str, *, required: bool = False, at_least: float | None = None):
    """A dataclass field with its --help text; a list default collects a repeated flag. A field
    typed Literal[...] accepts those values only; `at_least` is the smallest value accepted."""
    meta = {"help": help, "required": required, "at_least": at_least}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse_args(args_class, argv: list[str] | None = None):
    """Field `proj_dim` becomes flag `--proj-dim`; bool fields get --flag/--no-flag; list fields
    take the flag once per item (--val-out a --val-out b). A bad value ends in one line."""
    description = (sys.modules[args_class.__module__].__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(
        prog=Path(sys.argv[0]).name,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(args_class)
    for field in dataclasses.fields(args_class):
        flag, kind, meta = "--" + field.name.replace("_", "-"), hints[field.name], field.metadata
        options = dict(dest=field.name, help=meta["help"], required=meta["required"])
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # "int | None"
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if kind is bool:
            options |= dict(action=argparse.BooleanOptionalAction, default=field.default)
        elif typing.get_origin(kind) is list:
            options |= dict(action="append", type=typing.get_args(kind)[0])
        elif typing.get_origin(kind) is typing.Literal:
            options |= dict(choices=typing.get_args(kind), default=field.default)
        else:
            options |= dict(type=kind, default=field.default)
        parser.add_argument(flag, **options)
    values = vars(parser.parse_args(argv))
    for field in dataclasses.fields(args_class):
        at_least, value = field.metadata["at_least"], values[field.name]
        if value is None and typing.get_origin(hints[field.name]) is list:  # an unset list flag
            values[field.name] = field.default_factory()
        elif at_least is not None and value is not None and value < at_least:
            parser.error(f"--{field.name.replace('_', '-')} must be >= {at_least}, got {value}")
    return args_class(**values)


def run_main(main, args_class) -> None:
    """Parse the Args and run main(args); a DataError ends in one line, not a traceback."""
    args = parse_args(args_class)
    try:
        main(args)
    except DataError as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")
    # the stage's objects freed now, not at the interpreter's exit: a model held in reference
    # cycles holds a process group, whose gloo threads must end while Python can still run them
    gc.collect()
    print(f"{Path(sys.argv[0]).name}: {peak_memory()}", flush=True)


def peak_memory() -> str:
    """This process's resident high-water mark (VmHWM) and, on CUDA, the peak GPU allocation."""
    status = Path("/proc/self/status")
    found = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
    text = f"peak memory {int(found[1]) / 2**20:.2f} GiB resident" if found else "peak memory ?"
    torch = sys.modules.get("torch")  # never imported here: a numpy-only stage stays so
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated on the GPU"
    if os.environ.get("WORLD_SIZE", "1") != "1":
        text += f" (rank {os.environ.get('RANK')})"
    return text
