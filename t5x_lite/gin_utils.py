"""Gin plumbing shared by the entry points (train / eval / infer); the library itself never imports gin.

Command lines follow T5X: `--gin_file` (repeatable), `--gin_bindings` (repeatable), `--gin_search_paths`,
and the shorthand `--gin.MACRO=value` for `--gin_bindings=MACRO=value`.
"""
from __future__ import annotations

import os
from typing import Sequence

import gin
import gin.resource_reader

# The repository's gin/ folder, so that `include 'models/t5_1_1/defaults.gin'` resolves from anywhere.
DEFAULT_SEARCH_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


def _config_in_package_exists(config_path: str) -> bool:
    """gin's check for a config inside a Python package, with a folder that isn't one counted as not found.

    gin reads `runs/pretrain.gin` as file `pretrain.gin` of package `runs`. A plain `runs/` folder on sys.path (a
    namespace package: `make demo` writes `runs/demo/`) has no file location, and gin's check raises TypeError
    instead of going on to the next search path.
    """
    try:
        return gin.resource_reader.system_path_file_exists(config_path)
    except TypeError:
        return False


# gin keeps its readers as (open, exists) pairs in a module list; this swaps the check of the package reader.
gin.config._FILE_READERS[:] = [
    (reader, _config_in_package_exists if exists is gin.resource_reader.system_path_file_exists else exists)
    for reader, exists in gin.config._FILE_READERS
]


def rewrite_gin_shorthand(argv: Sequence[str]) -> list[str]:
    """`--gin.MODEL_DIR="'/tmp/run'"` -> `--gin_bindings=MODEL_DIR = '/tmp/run'`."""
    out = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin."):].split("=", 1)
            out.append(f"--gin_bindings={name} = {value}")
        else:
            out.append(arg)
    return out


def parse(gin_files: Sequence[str], gin_bindings: Sequence[str], gin_search_paths: Sequence[str] = ()) -> None:
    """Parses gin files and bindings; an unknown configurable or parameter raises a ValueError naming it."""
    for path in [".", *gin_search_paths, DEFAULT_SEARCH_PATH]:
        gin.add_config_file_search_path(path)
    for gin_file in gin_files:
        if not any(os.path.exists(os.path.join(p, gin_file)) for p in ["", *gin_search_paths, DEFAULT_SEARCH_PATH]):
            raise FileNotFoundError(
                f"gin file {gin_file!r} not found in the working directory or the search paths "
                f"{[*gin_search_paths, DEFAULT_SEARCH_PATH]}"
            )
    gin.parse_config_files_and_bindings(gin_files, gin_bindings, finalize_config=False)


def _is_required(value) -> bool:
    # `MACRO = %gin.REQUIRED` binds the macro to a reference to the constant gin.REQUIRED.
    return isinstance(value, gin.config.ConfigurableReference) and value.scoped_selector == "gin.REQUIRED/gin.constant"


_UNSET = object()


def _macro_value(name: str):
    """The value bound to macro `name`, or _UNSET when no gin file or binding sets it."""
    try:
        return gin.query_parameter(f"%{name}")
    except ValueError:
        return _UNSET


def _is_set(name: str) -> bool:
    value = _macro_value(name)
    return value is not _UNSET and not _is_required(value)


def check_required_macros(names: Sequence[str | tuple[str, ...]], optional: Sequence[str] = ()) -> None:
    """Raises a ValueError naming every macro in `names` that is unset or still `%gin.REQUIRED`, and every
    macro in `optional` that a gin file marked `%gin.REQUIRED` (e.g. INITIAL_CHECKPOINT_PATH in finetune.gin).

    An entry of `names` may be a tuple of alternatives, e.g. ("TRAIN_STEPS", "TRAIN_STEPS_RELATIVE"): it is
    satisfied when one of them is set to something other than None."""
    missing: list[tuple[str, ...]] = []
    for entry in names:
        if isinstance(entry, str) and not _is_set(entry):
            missing.append((entry,))
        elif isinstance(entry, tuple) and not any(_is_set(name) and _macro_value(name) is not None for name in entry):
            missing.append(entry)
    missing += [(name,) for name in optional if _is_required(_macro_value(name))]
    if missing:
        names_text = ", ".join(" or ".join(choices) for choices in missing)
        examples = " ".join(f"--gin.{choices[0]}=..." for choices in missing)
        raise ValueError(f"required gin macro(s) not set: {names_text}; set them in a gin file or with {examples}")
