"""The command line's wording of library errors. The library names the Python argument at fault in
backticks (```pretrained=True```, ```dense_path=FILE```, ```model_kwargs```); the command line shows
the flag that sets it instead (``--pretrained``, ``--dense-path FILE``, ``--model-kwargs``).

    with_flags("`pretrained=True`: give `dense_path=FILE`")   # "--pretrained: give --dense-path FILE"
"""
from __future__ import annotations

import re

# argument -> flag, where the library's argument is a flag of the command line
ARGUMENT_FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "allow_unsafe_pickle", "calib_dir", "calib_samples", "calib_source", "checkpoint", "dense_path", "eval_dir",
    "eval_samples", "export", "fashion_mnist", "hf_dataset", "mask_path", "model_kwargs", "model_name",
    "output_path", "pretrained", "pretrained_file", "random_init", "resume")}
# `source`: the data module's calibration source
ARGUMENT_FLAGS.update(block_names="--blocks", source="--calib-source")

_ARGUMENT = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]*))?`")


def with_flags(message: str) -> str:
    """``message`` with each backticked argument of ``ARGUMENT_FLAGS`` as its flag: ``name`` -> ``--name``,
    ``name=True`` -> ``--name``, ``name=VALUE`` -> ``--name VALUE``; other backticked text stays as it is."""
    def flag(match: re.Match) -> str:
        name, value = match.groups()
        if name not in ARGUMENT_FLAGS:
            return match.group(0)
        return ARGUMENT_FLAGS[name] if value in (None, "True") else f"{ARGUMENT_FLAGS[name]} {value}"
    return _ARGUMENT.sub(flag, message)
