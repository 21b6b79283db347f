"""sft_dagster: a declarative SFT pipeline (data quality gates -> fine-tuning -> evaluation) as Dagster assets."""

import logging

# bitsandbytes (imported by peft) warns at import on every CPU machine that it could not fetch an
# optional CPU 4-bit kernel from the Hugging Face hub; nothing is fetched at run time here, and its
# built-in CPU path is the one QLoRA uses and tests.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["SFTPipeline"]


def __getattr__(name: str):
    # `type: sft_dagster.SFTPipeline` in a dg project; imported on first use so that the training worker
    # and the pure stages do not import Dagster.
    if name == "SFTPipeline":
        from .defs.component import SFTPipeline

        return SFTPipeline
    raise AttributeError(f"module 'sft_dagster' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
