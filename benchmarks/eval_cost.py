"""Where the evaluation's time goes, part by part, and the same parts under another checkout of the code.

Parts, per model, on the spec's test rows and its evaluation settings (batch size, max_new_tokens, k
shots, retention prompts), each the call `evaluate` makes: `zero_shot` (`score_model` on the test
rows: greedy generation and the response loss), `few_shot` (base only: `score_model` on the k-shot
prompts, generation only) and `retention` (`score_retention`: 12 new tokens and the reference NLL);
`total` is their sum. `--halves` also times generation and loss on their own (`zero_shot_generate`,
`zero_shot_loss`, `retention_generate`, `retention_nll`: where a checkout computes the loss in the
generation's pass, these run it separately, so they are not parts of `total`).

`--new-rows N` times a nightly run instead: the last N test rows are new. The base model's retention
part is then read from the cache under every checkout (its key holds no test rows), and where a
checkout keeps generations row by row (`evaluation.RowStore`) its store first holds the base model's
zero- and few-shot generations of the other rows (untimed), so the timed parts generate the new rows
only; a checkout without it scores every row again, as its evaluation did. The candidate is new each
night: every part of it is timed in full.

Models: `base` (the spec's base model) and, with --adapter, `candidate` (the adapter merged into the
base, as `load_tuned_model` serves it). Each (source, model) runs in its own subprocess with
PYTHONPATH=source, so `--src A B` times two checkouts of the code (e.g. main and a branch) on the same
rows, in the order A B B A (a drift in the machine's load falls on both alike), and compares their
outputs: generations that differ (row by row, in the original order) and the relative change of each
loss. The JSON printed (and written to --out) holds every part's seconds per source and model, the
load average before and after, and the CPU model.

Build the test split first (the pipeline's pure stages up to the splits):

    sft-dagster run assets/demo_sentiment.yaml --select dataset_splits
    .venv/bin/python benchmarks/eval_cost.py --splits .sft/demo_sentiment/tables/dataset_splits.parquet \\
        --adapter ADAPTER_DIR --src /path/to/main /path/to/branch --out benchmarks/results/eval_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """Wall and CPU seconds per part (CPU: this process, all threads; with one thread it is what the part
    costs one core, however loaded the machine is)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def __call__(self, part: str, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        self.seconds[part] = round(time.perf_counter() - wall, 2)
        self.cpu_seconds[part] = round(time.process_time() - cpu, 2)
        return value


def worker(args) -> dict:
    """Runs under one source (PYTHONPATH): every part for one model, timed, with its outputs."""
    import pandas as pd
    import torch

    from sft_dagster import evaluation as ev
    from sft_dagster.models import resolve_base_model
    from sft_dagster.retention import retention_set
    from sft_dagster.spec import TaskSpec, load_spec
    from sft_dagster.torchkit import pick_precision

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    spec = load_spec(args.spec)
    if args.batch_size:
        spec = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"batch_size": args.batch_size})})
    cfg = spec.evaluation
    splits = pd.read_parquet(args.splits)
    rows = ev.test_rows(splits[splits["split"] == "test"].reset_index(drop=True), spec)
    if args.test_rows:
        rows = rows.head(args.test_rows)
    train = splits[splits["split"] == "train"]
    shots = ev.few_shot_examples(train, spec.task, cfg.few_shot_k, cfg.few_shot_seed)
    items = retention_set(args.retention_rows or cfg.retention_examples)
    model_dir = Path(args.model_dir) if args.model_dir else resolve_base_model(spec.model, ROOT / ".sft" / "models", Path(args.spec).parent).path
    device, precision = "cpu", pick_precision(spec.training.precision, "cpu")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.model == "base":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    else:
        model = ev.load_tuned_model(model_dir, Path(args.adapter), spec.training.adapter, device)
    task, plain = spec.task, TaskSpec(type="instruction")
    clock, outputs = Clock(), {}
    store, nightly = {}, bool(args.new_rows) and args.model == "base"
    if nightly and hasattr(ev, "RowStore"):  # last night's rows, generated (untimed) into a fresh store
        import tempfile

        store = {"store": ev.RowStore(Path(tempfile.mkdtemp()), {"model": "base"})}
        old = rows.head(len(rows) - args.new_rows)
        ev.score_model(model, tokenizer, old, spec, device, **store)
        if len(shots):
            ev.score_model(model, tokenizer, ev.with_few_shot(old, shots, task), spec, device, with_loss=False, **store)
        store["store"].computed = 0  # from here: the rows the timed parts generate
    # what `evaluate` runs, call by call
    scores = clock("zero_shot", lambda: ev.score_model(model, tokenizer, rows, spec, device, **store))
    outputs["zero_shot"] = {"raw": scores.raw_outputs, "loss": scores.loss}
    if args.model == "base" and len(shots):
        prompted = ev.with_few_shot(rows, shots, task)
        few = clock("few_shot", lambda: ev.score_model(model, tokenizer, prompted, spec, device, with_loss=False, **store))
        outputs["few_shot"] = {"raw": few.raw_outputs}
    if len(items) and nightly:  # the base model's retention scores come from the whole-part cache
        clock.seconds["retention"] = clock.cpu_seconds["retention"] = 0.0
    elif len(items):
        kept = clock("retention", lambda: ev.score_retention(model, tokenizer, items, cfg.batch_size, device,
                                                                       precision))
        outputs["retention"] = {"raw": kept["outputs"], "loss": kept["nll"]}
    for measure in (clock.seconds, clock.cpu_seconds):
        measure["total"] = round(sum(measure.values()), 2)
    if args.halves:  # generation and loss each on its own (the loss's forward, where a checkout shares it, runs again)
        clock("zero_shot_generate", lambda: ev.generate(model, tokenizer, rows, task, cfg.max_new_tokens,
                                                                     cfg.batch_size, device, precision))
        clock("zero_shot_loss", lambda: ev.response_loss(model, tokenizer, rows, task, spec.model.max_length,
                                                                      cfg.batch_size, device, precision))
        if len(items):
            clock("retention_generate", lambda: ev.generate(model, tokenizer, items, plain,
                                                                         ev.RETENTION_MAX_NEW_TOKENS, cfg.batch_size,
                                                                         device, precision))
            clock("retention_nll", lambda: ev.response_loss(model, tokenizer, items, plain, 10**6,
                                                                         cfg.batch_size, device, precision))
    return {"source": ev.__file__, "model": args.model, "new_rows": args.new_rows,
            "generated_rows": store["store"].computed if store else None, "load": [load_start[0], os.getloadavg()[0]], "n_test": len(rows), "n_retention": len(items), "k": len(shots),
            "batch_size": cfg.batch_size, "threads": torch.get_num_threads(), "seconds": clock.seconds,
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # KiB on Linux
            "cpu_seconds": clock.cpu_seconds, "outputs": outputs}


def _compare(a: dict, b: dict) -> dict:
    """Per part: generations that differ (same row, same position) and the relative loss change."""
    out = {}
    for part in a["outputs"]:
        x, y = a["outputs"][part], b["outputs"].get(part)
        if y is None:
            continue
        entry = {}
        if "raw" in x:
            entry["rows_differing"] = sum(p != q for p, q in zip(x["raw"], y["raw"]))
            entry["rows"] = len(x["raw"])
        if "loss" in x:
            entry["loss_relative_change"] = abs(y["loss"] - x["loss"]) / abs(x["loss"])
        out[part] = entry
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "assets" / "demo_sentiment.yaml"))
    parser.add_argument("--splits", required=True, help="the dataset_splits table (parquet)")
    parser.add_argument("--model-dir", default=None, help="the base model directory (default: the spec's, resolved)")
    parser.add_argument("--adapter", default=None, help="a candidate adapter trained on the spec's base model")
    parser.add_argument("--src", nargs="+", default=[str(ROOT)], help="checkouts of the code to time (1 or 2)")
    parser.add_argument("--test-rows", type=int, default=None, help="only the first N test rows (default: all)")
    parser.add_argument("--retention-rows", type=int, default=None, help="retention prompts (default: the spec's)")
    parser.add_argument("--halves", action="store_true", help="also time generation and loss each on its own")
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation.batch_size (default: the spec's)")
    parser.add_argument("--new-rows", type=int, default=0,
                        help="a nightly run: the last N test rows are new (see above; default 0: every part cold)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: torch's). 1 on a machine others load: two threads that "
                             "wait on each other at every operator measure the scheduler, not the work")
    parser.add_argument("--order", choices=["ab", "abba"], default="abba",
                        help="with two checkouts: each once, or A B B A (a drift in load falls on both alike)")
    parser.add_argument("--out", default=None, help="the report (JSON); each worker's result is kept beside it as it ends")
    parser.add_argument("--worker", choices=["base", "candidate"], default=None, dest="model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model:
        print(json.dumps(worker(args)))
        return 0
    if len(args.src) > 2:
        parser.error("--src takes one or two checkouts")
    models = ["base"] + (["candidate"] if args.adapter else [])
    order = args.src if len(args.src) == 1 or args.order == "ab" else [args.src[0], args.src[1], args.src[1], args.src[0]]
    passed = [a for a in sys.argv[1:] if not a.startswith("--src") and a not in args.src]
    runs: dict = {src: {m: [] for m in models} for src in args.src}
    load_before = os.getloadavg()
    for i, src in enumerate(order):
        for model in models if i % 2 == 0 else models[::-1]:
            env = {**os.environ, "PYTHONPATH": src}
            done = subprocess.run([sys.executable, __file__, *passed, "--worker", model], env=env, check=True,
                                  capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if args.out:
                Path(args.out).with_suffix(f".worker{i}_{model}.json").write_text(json.dumps(result) + "\n")
            print(json.dumps({"source": src, "model": model, "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
                              "load": result["load"], "max_rss_mib": result.get("max_rss_mib")}),
                  file=sys.stderr)
            runs[src][model].append(result)
    report = {
        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "n_test": runs[args.src[0]]["base"][0]["n_test"], "n_retention": runs[args.src[0]]["base"][0]["n_retention"],
        "k": runs[args.src[0]]["base"][0]["k"],
        "seconds": {src: {m: {part: [r["seconds"][part] for r in rs] for part in rs[0]["seconds"]} for m, rs in by.items()}
                    for src, by in runs.items()},
        "cpu_seconds": {src: {m: {part: [r["cpu_seconds"][part] for r in rs] for part in rs[0]["cpu_seconds"]}
                            for m, rs in by.items()} for src, by in runs.items()},
        "load_average_per_worker": {src: {m: [r["load"] for r in rs] for m, rs in by.items()} for src, by in runs.items()},
        "max_rss_mib": {src: {m: [r.get("max_rss_mib") for r in rs] for m, rs in by.items()} for src, by in runs.items()},
        "generated_rows": {src: {m: [r.get("generated_rows") for r in rs] for m, rs in by.items()} for src, by in runs.items()},
    }
    if len(args.src) == 2:
        a, b = args.src
        report["outputs_b_vs_a"] = {m: _compare(runs[a][m][0], runs[b][m][0]) for m in models}
        if args.order == "abba":
            report["repeat_a_vs_a"] = {m: _compare(runs[a][m][0], runs[a][m][1]) for m in models}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
