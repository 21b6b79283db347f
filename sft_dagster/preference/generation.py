"""Candidate replies to rank: K samples per prompt from a model (a base, optionally with an adapter).

Sampling is seeded per reply: each (prompt, sample index) draws its tokens from its own random
generator, seeded from the run's seed and the prompt's content hash. The same seed, prompts and model
give the same candidates whatever the batch size or the order of the prompts (up to float rounding
of padded logits, which would have to land a draw exactly on a probability boundary to change it),
and adding prompts never changes the candidates of the others. Prompts that do not leave room for
`max_new_tokens` within the model's max_length are refused with their reason (never truncated), so
every candidate later fits a preference pair. Identical samples of one prompt are kept once (a pair
of identical replies teaches nothing). Candidate ids are content hashes of (prompt_id, response).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import torch

from ..formatting import generation_prompt_ids, pad_id
from ..schema import column_or_none, quarantine_rows
from ..spec import TaskSpec
from ..torchkit import autocast, pick_device, pick_precision
from .columns import CANDIDATE_COLUMNS, candidate_id_of, prompt_id_of
from ..spec.preference import CandidateGenerationConfig


def sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """The random seed of one reply: a pure function of the run's seed, the prompt and the sample."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class RowSeededSampler:
    """A logits processor that samples each row's next token from that row's own generator.

    Temperature, then nucleus (top-p) filtering, then one multinomial draw on CPU from the row's
    `torch.Generator`; it returns scores that are 0 at the drawn token and -inf elsewhere, so
    `generate`'s greedy step takes exactly the drawn token. Rows never share random numbers, so a
    reply does not depend on which other rows are in its batch.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        from transformers import TopPLogitsWarper

        if temperature <= 0:
            raise ValueError("temperature must be > 0 (sampling); use greedy generation for temperature 0")
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = float(temperature)
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        probs = torch.softmax(scores, dim=-1).cpu()
        picks = torch.stack([torch.multinomial(probs[row], 1, generator=g)[0] for row, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), picks.to(scores.device)] = 0.0
        return out


@torch.no_grad()
def sample_continuations(model, tokenizer, prompts: list[list[int]], seeds: list[int], *, temperature: float,
                         top_p: float, max_new_tokens: int, batch_size: int, device: str,
                         precision: str = "fp32", min_new_tokens: int = 0) -> list[tuple[list[int], bool]]:
    """Sampled reply tokens for each prompt (token ids) with its own seed: (ids, finished) per prompt.

    `ids` run up to and including the end-of-turn token when the reply finished, else they are the
    `max_new_tokens` drawn. Batched with left padding, prompts grouped by length. Temperature 0 is
    greedy decoding (the seeds are not used); `min_new_tokens` holds the end-of-turn token back until
    that many tokens were generated (a timed run of a fixed length).
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                              **({"min_new_tokens": min_new_tokens} if min_new_tokens else {}))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[tuple[list[int], bool]] = [([], False)] * len(prompts)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [prompts[i] for i in rows]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        samplers = [RowSeededSampler([seeds[i] for i in rows], temperature, top_p)] if temperature > 0 else []
        with autocast(device, precision):
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                       logits_processor=LogitsProcessorList(samplers))
        for i, row in zip(rows, generated[:, width:].tolist()):
            if eos in row:
                out[i] = (row[: row.index(eos) + 1], True)
            else:
                out[i] = (row, False)
    model.train(was_training)
    return out


def load_generator_model(model_dir: Path, adapter_dir: Path | None, device: str, adapter_method: str = "lora"):
    """The model that writes candidates: the base, or the base with an SFT adapter merged (or a full model)."""
    from transformers import AutoModelForCausalLM

    if adapter_dir is None:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    from ..artefacts import load_tuned_model

    return load_tuned_model(Path(model_dir), Path(adapter_dir), adapter_method, device)


def generate_candidates(prompts: pd.DataFrame, model_dir: str | Path, *, task: TaskSpec,
                        config: CandidateGenerationConfig, max_length: int, adapter_dir: str | Path | None = None,
                        adapter_method: str = "lora", device: str = "auto", model_name: str | None = None,
                        model=None, tokenizer=None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """K sampled replies per distinct prompt -> (candidates, quarantine of refused prompts, stats).

    prompts: a frame with `prompt` and optionally `system`, `history`, `example_id`, `source_file`,
    `source_line`. A prompt whose chat-template tokens plus `max_new_tokens` exceed `max_length` is
    refused into the quarantine with its token count. `model`/`tokenizer` may be passed already
    loaded (tests, or a caller that generates several times).
    """
    from transformers import AutoTokenizer

    device = pick_device(device)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    systems = [s if isinstance(s, str) and s else None for s in column_or_none(prompts, "system")]
    histories = [h if isinstance(h, str) and h else None for h in column_or_none(prompts, "history")]
    frame = prompts.assign(system=systems, history=histories).reset_index(drop=True)
    frame["prompt_id"] = [prompt_id_of(p, s, h) for p, s, h in zip(frame["prompt"], systems, histories)]
    duplicate = frame["prompt_id"].duplicated()
    distinct = frame[~duplicate].reset_index(drop=True)
    prompt_ids = [generation_prompt_ids(tokenizer, p, s, task, h)
                  for p, s, h in zip(distinct["prompt"], distinct["system"], distinct["history"])]
    n_tokens = pd.Series([len(ids) for ids in prompt_ids])
    too_long = n_tokens + config.max_new_tokens > max_length
    refused = distinct[too_long.to_numpy()]
    if "example_id" not in refused.columns:
        refused = refused.assign(example_id=refused["prompt_id"])
    reasons = ("prompt is " + n_tokens[too_long].astype(str) + f" tokens; with max_new_tokens {config.max_new_tokens} "
               f"it does not fit model.max_length {max_length} (refused, not truncated)")
    quarantine = quarantine_rows(refused, "candidates", reasons.reset_index(drop=True))
    kept = distinct[~too_long.to_numpy()].reset_index(drop=True)
    kept_ids = [ids for ids, bad in zip(prompt_ids, too_long) if not bad]

    jobs = [(row, k) for row in range(len(kept)) for k in range(config.k)]
    samples: list[tuple[list[int], bool]] = []
    if jobs:
        model = model if model is not None else load_generator_model(
            Path(model_dir), Path(adapter_dir) if adapter_dir else None, device, adapter_method)
        samples = sample_continuations(
            model, tokenizer, [kept_ids[row] for row, _ in jobs],
            [sample_seed(config.seed, kept.loc[row, "prompt_id"], k) for row, k in jobs],
            temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size, device=device, precision=pick_precision("auto", device))
    eos = tokenizer.eos_token_id
    name = model_name or (str(model_dir) + (f"+{adapter_dir}" if adapter_dir else ""))
    records = []
    for (row, k), (ids, finished) in zip(jobs, samples):
        text = tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)
        p = kept.loc[row]
        records.append({"prompt_id": p["prompt_id"], "candidate_id": candidate_id_of(p["prompt_id"], text),
                        "prompt": str(p["prompt"]), "system": p["system"], "history": p["history"], "response": text,
                        "sample_index": k, "finished": finished, "n_response_tokens": len(ids), "model": name,
                        "seed": config.seed, "temperature": config.temperature, "top_p": config.top_p,
                        "max_new_tokens": config.max_new_tokens})
    candidates = pd.DataFrame(records, columns=CANDIDATE_COLUMNS)
    repeat = candidates["candidate_id"].duplicated()
    candidates = candidates[~repeat].reset_index(drop=True)
    stats = {
        "prompts_in": len(frame),
        "duplicate_prompts": int(duplicate.sum()),
        "prompts_refused": int(too_long.sum()),
        "prompts_sampled": len(kept),
        "samples": len(jobs),
        "duplicate_samples": int(repeat.sum()),
        "candidates": len(candidates),
        "unfinished_candidates": int((~candidates["finished"].astype(bool)).sum()),
    }
    return candidates, quarantine, stats
