"""sft_dagster: a declarative SFT pipeline (data quality gates -> fine-tuning -> evaluation) as Dagster assets."""

import logging

# bitsandbytes (imported by peft) warns at import on every CPU machine that it could not fetch an
# optional CPU 4-bit kernel from the Hugging Face hub; nothing is fetched at run time here, and its
# built-in CPU path is the one QLoRA uses and tests.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
