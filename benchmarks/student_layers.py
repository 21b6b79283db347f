"""A student derived from SmolLM2-135M-Instruct by keeping 15 of its 30 decoder layers: how much smaller,
how much faster, and which layers to keep.

Derives the student as `model.keep_layers: 15` does (`models.derive_layers`: evenly spaced, the first
and the last layer kept) and compares it, before any training, with the full model and with DistilBERT's
choice (every other layer from the first: 0, 2, ..., 28, the last layer dropped):

- parameters;
- the mean reply-token NLL of the retention set's reference answers (`retention.retention_set`, 200
  general prompts; lower = a better starting point for distillation);
- greedy generation speed (`student.measure_speed`: every prompt generates exactly `--new-tokens`
  tokens, passes alternating between the models, fastest pass each) for the full model and the derived
  one, in this run.

    .venv/bin/python benchmarks/student_layers.py --model-dir .sft/models/SmolLM2-135M-Instruct.Q4_1-<hash>
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="a local model directory (e.g. the converted embedded model)")
    parser.add_argument("--keep", type=int, default=15)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--speed-prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_dagster import models
    from sft_dagster.evaluation import response_loss
    from sft_dagster.retention import retention_set
    from sft_dagster.spec import StudentReportSpec, TaskSpec
    from sft_dagster.student import measure_speed, parameter_count

    source = Path(args.model_dir)
    tok = AutoTokenizer.from_pretrained(source)
    items = retention_set(args.items)
    plain = TaskSpec(type="instruction")
    out: dict = {"model": str(source), "keep": args.keep, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        derived_dir = models.derive_layers(source, args.keep, Path(cache))
        out["derive_seconds"] = round(time.perf_counter() - start, 1)
        full = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        derived = AutoModelForCausalLM.from_pretrained(derived_dir, dtype=torch.float32).eval()
        n = full.config.num_hidden_layers
        # scored without a KV cache only, so its layers keep their old cache indices harmlessly
        every_other = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        every_other.model.layers = torch.nn.ModuleList(every_other.model.layers[i] for i in range(0, n, n // args.keep)[:args.keep])
        choices = {"full": (full, list(range(n))), "first_and_last": (derived, models.kept_layers(n, args.keep)),
                   "every_other_from_0": (every_other, list(range(0, n, n // args.keep))[:args.keep])}
        for name, (model, kept) in choices.items():
            start = time.perf_counter()
            nll = response_loss(model, tok, items, plain, 10**6, 16, "cpu")
            out[name] = {"layers": kept, "parameters": parameter_count(model), "retention_reference_nll": round(nll, 4),
                         "nll_seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps({name: out[name]}), flush=True)  # partial results, in case the speed part is cut short
        speed = measure_speed({"full": (full, tok), "first_and_last": (derived, tok)}, items, plain,
                              StudentReportSpec(speed_prompts=args.speed_prompts, speed_new_tokens=args.new_tokens,
                                                speed_repeats=args.repeats), 16, "cpu", "fp32")
        for name, s in speed.items():
            out[name]["speed"] = s
        out["speedup"] = round(speed["first_and_last"]["tokens_per_second"] / speed["full"]["tokens_per_second"], 3)
        out["parameters_ratio"] = round(out["first_and_last"]["parameters"] / out["full"]["parameters"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
