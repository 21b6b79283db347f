"""Response-quality findings for generation data (qa, summarization, translation, style, instruction).

`find_response_issues(df, task, cfg, model_dir, cache_dir)` returns one row per input row (by
`example_id`) saying whether the response looks bad, how, how sure, and why in a sentence. Pure:
DataFrames in and out, no Dagster. Each finding is one function registered in `FINDINGS` with the
`finding` decorator (adding a finding = one function + its registration); `quality.response.findings`
picks which run and `quality.response.warnings` which of them only warn.

Findings. Numbers MEASURED with SmolLM2-135M-Instruct as the base model on 300 rows each of multi30k val
(en->fr captions; seeds 0 and 1) and DialogSum dev, with `quality.noise.plant_response_noise` planting
15% (or 5%) of the rows each misaligned / German (multi30k) / copied, and 5% truncated; precision counts
a flag right only when the planted kind is the finding's own (development measurements of 2026-12-08;
benchmarks/response_findings.py measures the same way on the full data sets, for BENCHMARKS.md):

- `misaligned`: the base model's mean loss on the response with its prompt vs without it
  (`response_fit.py`, the end-of-turn token left out); their ratio is IFD. A pair whose response belongs
  to another prompt gains almost nothing from its prompt: multi30k IFD 0.99 +- 0.06 planted vs 0.81 +-
  0.10 clean, DialogSum 0.94 +- 0.08 vs 0.60 +- 0.10. Flagged: a row whose gain (1 - IFD) is at most
  `fit.max_relative_gain` (0.3) of the dataset's median row's gain (rows other findings explain left out
  of the median), a threshold relative to how much this model gains on this data. Measured at 0.3:
  multi30k 15%: precision 0.84 / 0.88, recall 0.84 / 0.80 (seeds 0 / 1); multi30k 5%: 0.47 / 0.93 (the
  clean tail, 16 of 240 clean rows, is as large as the planted set); DialogSum 15%: 0.97 / 0.71, 5%: 0.93
  / 0.87. 0.35 or 0.4 would raise DialogSum's recall to 0.80 / 0.82 and drop multi30k seed 0's
  precision to 0.72 / 0.68, so 0.3 stays. Tried and dropped: a robust z-score of log IFD (45% planted
  rows widen the MAD until nothing is an outlier: 0 flags at z >= 2); few-shot demonstrations in the
  context (AUROC 0.972 vs 0.958, three times the tokens); the reverse direction, prompt given response
  (0.965 combined); a mixture model of the IFD (unstable at 5%); as the score itself, the loss with the
  own prompt vs with another row's (AUROC 0.950 vs IFD's 0.970 on all 1,014 multi30k rows, 5% planted):
  decoys serve the precision estimate instead (below). The finding abstains when the median IFD
  is above `MAX_MEDIAN_IFD` (a model that reads no prompt, like the tests' random one).
- `wrong_language`: py3langid over a plausible set of languages (the ~30 most used, plus the expected
  ones): flagged when another language is detected with p >= `language.min_probability` and the
  expected language has p <= `language.max_expected_probability`. Restricting the set keeps short
  captions from being read as Frisian or Luxembourgish: on the first 3 words of each multi30k caption,
  the full 140-language model and the restricted one both flagged 0.1% of French captions, but recall on
  German rose from 0.58 to 0.91 and on English from 0.16 to 0.52. py3langid's probabilities are tempered
  by sqrt(text bytes), so 1-2 word responses are rarely confident enough to flag (recall on 2-word
  English 0.21): short answers are left alone, by design. Full captions (all 1,014): 0 French captions
  flagged, German and English 1.00 recall; on the benchmark precision and recall 1.00.
  Expected language: `task.response_language`; else, for translation, the dataset's dominant response
  language; else the language of the row's own prompt (a French question answered in French is fine).
  Translation also checks the prompt against `task.prompt_language` (or the dominant prompt language).
- `copy`: the normalised response equals or nearly equals the prompt (difflib ratio >=
  `copied.min_similarity`: an untranslated target, an echoed input), or is one contiguous chunk of it of
  at least `copied.min_words` words (a summary that is the dialogue's first turn). Each rule applies only
  where copying is not the dataset's norm (median similarity / chunk share under 0.5): extractive QA
  answers are spans of their context by design. Benchmark: precision 1.00, recall 1.00 (multi30k) and
  0.98 (DialogSum first-turn copies).
- `truncated`: the response ends on a comma, colon, dash or a function word of its language ("the", "de",
  "und" ...), or without terminal punctuation where at least `truncation.min_terminal_share` of the
  dataset's responses have it and the response is short for its prompt (length z <=
  `TRUNCATED_MAX_LENGTH_Z`). A cut that ends on a content word of a response whose length still looks
  normal is not seen. Measured (cuts at 30-70% of the words): multi30k precision 0.88 / 1.00 / 1.00,
  recall 1.00 (15% seeds 0 / 1, 5%); DialogSum 1.00 / 0.73 (15%) and 0.93 / 0.87 (5%); 4 of the 1,014
  clean multi30k rows (complete captions without a final stop, short for their prompt). The base
  model's loss on the end-of-turn token was tried: it mostly says whether a response ends on a full stop
  (2.5-27 nats on complete captions without one), no more than the rule.
- `length`: log(response / prompt characters) a robust outlier (|modified z| >= `length.max_z`).
- `boilerplate` (a warning by default): refusals and assistant filler ("As an AI language model", "I'm
  sorry, but I can't", "Sure! Here is"); English patterns only.

Explaining away: a finding may name findings that explain its hits (`explained_by`); it runs after them
and does not flag their rows again, so each bad row carries its most specific kind: an untranslated
copy is a `copy`, not also `wrong_language`; a German response is not also `misaligned` (it gains as
little from an English prompt); `length` flags only what no other finding explains.

Estimated precision: each hit gets an estimated probability of being a real issue, MODEL-ESTIMATED, not
measured on your data. `misaligned`: from decoys (`decoy_precision`): `fit.decoy_rows` responses scored
after another row's prompt are misaligned pairs of this very data, so their relative gains show where a
misaligned row lies; the rows below the decoys' lower quartile (one taken as clean) / 0.25 estimate how
many misaligned rows the data holds, and the share of decoys under the threshold how many of them are
candidates: estimate = that / the candidates, the same for every flag. Below `fit.min_estimated_precision`
(0.5) the candidates are warnings, not flags. Measured on Multi30k (1,014 rows, SmolLM2-135M): 5%
planted misaligned, 77 candidates, estimate above 0.5, all flagged, 42 of the 51 planted (measured
precision 0.55); the clean rows, 46 candidates, estimate 0.00, none flagged. (The estimate it replaced,
a normal fitted to the rows below the threshold, expected 83-94 clean rows above it where 31 were: it
abstained on both.) `wrong_language`: 1 -
p(expected language) (py3langid's own calibration); `length`: the normal tail of its robust z (1 - the
Benjamini-Hochberg q-value); `copy`: the copied share itself; `truncated` and `boilerplate` are rules
without an estimate (NaN; a rule hit ranks at `RULE_HIT_SCORE`). The queue's
`estimated_precision_at_rank` is the running mean of the estimates over the flagged rows, worst first.
Measured overall on the kinds the issue targets (misaligned, wrong language, copy): precision 0.96 /
0.98, recall 0.98 / 0.94 (multi30k 15%); 0.73 / 0.98 (multi30k 5%); 1.00 / 0.84 and 0.97 / 0.97
(DialogSum 15% / 5%); ranking by `response_issue_score`, recall at precision >= 0.80 is 0.84-0.99.

Cost: the text findings take 7-19 s per 1,000 rows; `misaligned` runs the base model over every row
twice (with and without its prompt; the shared system turn and template head once): 79k tokens per
1,000 multi30k rows, 284k per 1,000 DialogSum rows. Measured on 2 cores shared with other jobs (load 2-5,
fp32, SmolLM2-135M): 690 CPU-s / 825 s wall per 1,000 multi30k rows, 2,017 CPU-s / 3,175 s per 1,000
DialogSum rows; the plain decoder ran at 124 tokens/s there (this scoring at 134), so an idle machine
is several times faster. Cached per row content: a re-run scores only new or changed rows (1,014 cached
multi30k rows: 3 s). The label_issues pre-flight estimates it beside the label views (`response_fit`).
"""

from __future__ import annotations

import difflib
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..spec import ResponseQualitySpec, TaskSpec
from .check_registry import CheckDef, CheckOutcome

MAD_SCALE = 1.4826  # MAD of a normal sample times this estimates its standard deviation
DISABLED = "not run: disabled in the spec (quality.response.enabled: false)"
COPY_NORM_MAX = 0.5  # a copy rule is applied only where the dataset's median copied share is below this
CONFIDENT = 0.9  # a language detection this sure counts when finding a dataset's (or a prompt's) language
SIMILARITY_MAX_CHARS = 5000  # longer texts are compared word by word (difflib is quadratic)
PRECISION_AT = (10, 25, 50, 100, 200, 500)
# `misaligned` abstains when the median row's IFD is above this: the base model reads nothing from the
# prompts (a tiny random model: ~1.00). SmolLM2-135M on multi30k en->fr: median 0.81 on clean rows.
MAX_MEDIAN_IFD = 0.97
# "no terminal punctuation" counts as truncated only on a response shorter than usual for its prompt
# (robust z of the length ratio at most this): multi30k's clean captions without a final stop had z
# -0.6 to 1.7, the planted cuts -10 to -1.3.
TRUNCATED_MAX_LENGTH_Z = -1.0
# The misaligned flags' precision is estimated from decoys (`decoy_precision`): at least MIN_DECOYS of
# them, and the rows below their DECOY_QUANTILE taken as misaligned. Measured on multi30k en->fr (1,014
# rows, 5% misaligned, SmolLM2-135M): decoy relative gains -0.33 / -0.14 / 0.07 (10th / 25th / 50th
# percentile); below the lower quartile lay 1 clean row (of 810) and 25% of the planted ones, below the
# median 9-12 clean rows, so the quartile, not the median, is where misaligned rows can be counted.
# One row below the quartile is taken as a clean one (1 of the 810 clean rows there; without it, one
# stray row of a clean data set would estimate 4 misaligned rows among a handful of candidates).
MIN_DECOYS = 16
DECOY_QUANTILE = 0.25
STRAY_CLEAN_ROWS = 1
RULE_HIT_SCORE = 0.5  # the score of a hit by a rule without an estimate (truncated): below sure model findings
RESPONSE_WARNING_SEVERITY = 0.05  # a row with only a warning (boilerplate) sorts below every issue

# The languages most texts are in; detections are restricted to these plus the expected ones.
PLAUSIBLE_LANGUAGES = ("en", "fr", "de", "es", "it", "pt", "nl", "ru", "zh", "ja", "ko", "ar", "pl", "tr", "sv",
                       "da", "no", "fi", "cs", "hu", "ro", "el", "he", "hi", "uk", "vi", "id", "th", "ca", "bg")
LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
                  "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese",
                  "ko": "Korean", "ar": "Arabic", "pl": "Polish", "tr": "Turkish", "sv": "Swedish", "da": "Danish",
                  "no": "Norwegian", "fi": "Finnish", "cs": "Czech", "hu": "Hungarian", "ro": "Romanian",
                  "el": "Greek", "he": "Hebrew", "hi": "Hindi", "uk": "Ukrainian", "vi": "Vietnamese",
                  "id": "Indonesian", "th": "Thai", "ca": "Catalan", "bg": "Bulgarian"}

TERMINAL = set(".!?…。！？;؟")  # ';' ends a Greek question
CLOSERS = "\"'”’»)]}*_`"
DANGLING_PUNCTUATION = set(",:-–—(/&+")
# Words a finished sentence does not end on (articles, prepositions, conjunctions, possessives), per
# language: the response's own detected language picks the list, so French "but" (goal) or English "die"
# and "son" are not read as another language's function word. Particles that can end a sentence ("come
# in", "and so on") are left out.
DANGLING_WORDS = {
    "en": frozenset("the a an and or of to with for at by from but that into onto than his her their its my your our".split()),
    "fr": frozenset("le la les un une des de du et ou à au aux dans sur avec pour par que qui ses leur leurs".split()),
    "de": frozenset("der die das ein eine einen einem einer und oder mit von zu im auf für den dem des zum zur".split()),
    "es": frozenset("el la los las un una unos y o de con por para del al que".split()),
    "it": frozenset("il lo la gli le un una e o di da per che della nel con".split()),
    "pt": frozenset("o a os as um uma e ou de com do da dos das no na para que".split()),
}

BOILERPLATE = [(re.compile(p, re.IGNORECASE), what) for p, what in (
    (r"\bas an? (?:ai|artificial intelligence)(?: language model| assistant| model)?\b", "as an AI language model"),
    (r"\bas a (?:large )?language model\b", "as a language model"),
    (r"\bI(?:'m| am) (?:sorry|afraid),? (?:but )?I (?:can(?:no|')t|cannot|am unable|'m unable|won't)\b", "a refusal"),
    (r"\bI (?:cannot|can't|am unable to|won't be able to) (?:help|assist|provide|comply|fulfil)", "a refusal"),
    (r"^\s*(?:sure|certainly|of course|absolutely)[!,.]?\s+here(?:'s| is| are)\b", "assistant filler"),
    (r"\bI hope this helps\b", "assistant filler"),
    (r"\bI don't have (?:personal (?:opinions|experiences|feelings)|the ability to)\b", "as an AI language model"),
)]


@dataclass
class Rows:
    """What every finding sees: the rows (index 0..n-1), the task, the config, and shared work (`memo`)."""

    frame: pd.DataFrame
    task: TaskSpec
    cfg: ResponseQualitySpec
    model_dir: Path | None
    cache_dir: Path | None
    prompts: list[str]
    responses: list[str]
    memo: dict

    def __len__(self) -> int:
        return len(self.responses)


@dataclass
class FindingResult:
    hit: np.ndarray  # bool per row
    probability: np.ndarray  # estimated chance a hit row has the issue (NaN: no estimate)
    reasons: list  # a sentence per hit (or warned) row, None elsewhere
    columns: dict  # raw score columns, one value per row
    info: dict  # thresholds, counts, how the estimate is made; `status`: run / abstained / not evaluated
    suspicion: np.ndarray | None = None  # every row, 0..1, higher = more like the issue: ranks unflagged rows
    warn: np.ndarray | None = None  # rows shown as warnings though not hit (e.g. candidates left unflagged)


class NotEvaluated(Exception):
    """A finding that cannot run on these inputs (e.g. no base model given); the gate fails on it."""


@dataclass(frozen=True)
class Finding:
    kind: str
    run: Callable[[Rows], FindingResult]
    description: str
    needs_model: bool = False
    # Findings whose hits explain this one's (run first; their rows in `rows.memo["explained"]`).
    explained_by: tuple[str, ...] = ()


FINDINGS: dict[str, Finding] = {}


def finding(kind: str, description: str, needs_model: bool = False, explained_by: tuple[str, ...] = ()):
    """Register a finding: `fn(rows) -> FindingResult`."""
    def register(fn: Callable[[Rows], FindingResult]) -> Callable[[Rows], FindingResult]:
        FINDINGS[kind] = Finding(kind, fn, description, needs_model, explained_by)
        return fn
    return register


def response_preflight(plan: dict | None, df: pd.DataFrame, task: TaskSpec, cfg: ResponseQualitySpec,
                       model_dir: Path | None = None, cache_dir: Path | None = None) -> dict | None:
    """The label-issue pre-flight `plan` with the `misaligned` finding's scoring (the only costly finding)
    added as the view `response_fit`, measured on a sample (`response_fit.fit_preflight`); `plan` as it
    was when that finding will not run."""
    from .response_fit import fit_preflight

    if not needs_base_model(task, cfg) or model_dir is None:
        return plan
    plan = dict(plan) if plan and plan.get("enabled") else {"rows": len(df), "views": {}}
    plan["views"] = {**plan.get("views", {}), "response_fit": fit_preflight(
        df.reset_index(drop=True), task, model_dir, cache_dir, batch_size=cfg.fit.batch_size,
        max_tokens=cfg.fit.max_tokens)}
    plan["estimated_seconds_total"] = round(sum(v["estimated_seconds"] for v in plan["views"].values()), 1)
    return plan


def needs_base_model(task: TaskSpec, cfg: ResponseQualitySpec) -> bool:
    """Whether `find_response_issues` will need the base model directory for this task and config."""
    return (not task.is_label_task and cfg.enabled
            and any(FINDINGS[k].needs_model for k in cfg.findings if k in FINDINGS))


# ---------------------------------------------------------------------------------------------------
# Shared statistics


def robust_z(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(modified z-scores, median, robust sd): (x - median) / (MAD_SCALE * MAD), NaN stays NaN."""
    x = np.asarray(values, dtype=float)
    finite = x[np.isfinite(x)]
    if len(finite) == 0:
        return np.full(len(x), np.nan), float("nan"), float("nan")
    median = float(np.median(finite))
    spread = MAD_SCALE * float(np.median(np.abs(finite - median)))
    if spread <= 0:  # more than half the rows equal: fall back to the mean absolute deviation
        spread = 1.2533 * float(np.mean(np.abs(finite - median)))
    spread = max(spread, 1e-9)
    return (x - median) / spread, median, spread


def tail_precision(z: np.ndarray, two_sided: bool = False) -> np.ndarray:
    """1 - Benjamini-Hochberg q-value of each row's z under a standard normal null (upper tail, or both):
    the estimated share of true issues among rows at least this far out. NaN where z is NaN."""
    from scipy.stats import norm

    z = np.asarray(z, dtype=float)
    out = np.full(len(z), np.nan)
    ok = np.flatnonzero(np.isfinite(z))
    if len(ok) == 0:
        return out
    p = 2 * norm.sf(np.abs(z[ok])) if two_sided else norm.sf(z[ok])
    order = np.argsort(p, kind="stable")
    q = p[order] * len(ok) / np.arange(1, len(ok) + 1)
    q = np.minimum.accumulate(q[::-1])[::-1]
    out[ok[order]] = 1.0 - np.clip(q, 0.0, 1.0)
    return out


def decoy_precision(relative_gain: np.ndarray, eligible: np.ndarray, candidates: int, decoy_gain: np.ndarray,
                    threshold: float) -> tuple[float, dict]:
    """Estimated precision of the `candidates` (eligible rows with relative gain <= `threshold`) from decoys:
    responses scored after another row's prompt, misaligned by construction, so their relative gains are
    what a misaligned row of this data looks like. Below the decoys' lower quartile (`DECOY_QUANTILE`)
    almost only misaligned rows lie, so the rows there (less `STRAY_CLEAN_ROWS` taken as clean) /
    DECOY_QUANTILE estimate how many misaligned rows the data holds; the share of decoys under the
    threshold, how many of them are candidates. NaN with fewer than `MIN_DECOYS` decoys."""
    d = np.asarray(decoy_gain, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) < MIN_DECOYS or not candidates:
        return float("nan"), {"decoys": int(len(d))}
    level = float(np.quantile(d, DECOY_QUANTILE))
    below = int((eligible & (np.nan_to_num(relative_gain, nan=np.inf) <= level)).sum())
    misaligned = max(0, below - STRAY_CLEAN_ROWS) / DECOY_QUANTILE
    share = float(np.mean(d <= threshold))
    return min(1.0, misaligned * share / candidates), {
        "decoys": int(len(d)), "decoy_reference_gain": _r(level), "rows_below_reference": below,
        "estimated_misaligned_rows": _r(misaligned, 1), "decoy_share_flagged": _r(share)}


def flag_threshold(relative_gain: np.ndarray, eligible: np.ndarray, decoy_gain: np.ndarray, max_gain: float,
                   min_precision: float) -> tuple[float | None, float, dict]:
    """The largest relative-gain cut in `max_gain`, `max_gain` - 0.05, ..., 0 whose candidates' estimated
    precision (`decoy_precision`) reaches `min_precision`: (cut, its precision, the estimate's figures);
    (None, the precision at `max_gain`, ...) when none does. Clean rows thin out faster than misaligned
    ones as the cut falls: Multi30k seed 1 (5% planted), 77 candidates at 0.3 estimated 0.49 (measured
    0.52); a lower cut trades a little recall for precision instead of flagging nothing."""
    first = None
    for cut in np.round(np.arange(max_gain, -1e-9, -0.05), 4):
        n = int((eligible & (np.nan_to_num(relative_gain, nan=np.inf) <= cut)).sum())
        precision, info = decoy_precision(relative_gain, eligible, n, decoy_gain, float(cut))
        first = first or (precision, info)
        if n and precision >= min_precision:
            return float(cut), precision, {**info, "flag_relative_gain": float(cut), "flagged_candidates": n}
    return None, first[0], first[1]


def running_precision(flagged: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """In the given (worst-first) order: the mean estimate over the flagged rows down to each flagged row
    (rows without an estimate are skipped); NaN on rows not flagged or before any estimate."""
    flagged = np.asarray(flagged, dtype=bool)
    counted = flagged & np.isfinite(estimate)
    seen = np.cumsum(counted)
    running = np.cumsum(np.where(counted, estimate, 0.0)) / np.maximum(seen, 1)
    return np.where(flagged & (seen > 0), running, np.nan)


def _none(n: int) -> list:
    return [None] * n


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan)


# ---------------------------------------------------------------------------------------------------
# Findings


def content_keys(rows: Rows) -> list[str]:
    """A key per row of what it holds (`response_fit.row_keys` without the model): the decoys' order."""
    from .response_fit import row_keys

    return row_keys(rows.frame, rows.task, "")


@finding("misaligned", "the response does not follow from its prompt (the base model gains almost nothing from it)",
         needs_model=True, explained_by=("wrong_language", "copy"))
def misaligned(rows: Rows) -> FindingResult:
    from .response_fit import response_losses

    fit = rows.cfg.fit
    if rows.model_dir is None:
        raise NotEvaluated("needs the base model directory (model_dir)")
    losses, cost = response_losses(rows.frame, rows.task, rows.model_dir, rows.cache_dir,
                                   batch_size=fit.batch_size, max_tokens=fit.max_tokens)
    with_p, without = losses["loss_with_prompt"].to_numpy(), losses["loss_without_prompt"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ifd = with_p / without
    # Rows another finding explains (a German or a copied response also gains nothing) are left out of
    # the reference median and are not flagged again.
    explained = rows.memo.get("explained", np.zeros(len(rows), dtype=bool))
    reference = ifd[np.isfinite(ifd) & ~explained]
    median_ifd = float(np.median(reference)) if len(reference) else None
    informative = median_ifd is not None and median_ifd <= MAX_MEDIAN_IFD
    relative_gain = (1.0 - ifd) / (1.0 - median_ifd) if informative else _nan(len(rows))
    candidate = informative & (np.nan_to_num(relative_gain, nan=np.inf) <= fit.max_relative_gain) & ~explained
    hit = candidate.copy()
    candidates = int(candidate.sum())
    precision, estimate = float("nan"), {}
    if candidates:
        from .response_fit import decoy_losses, decoy_pairs

        eligible = np.isfinite(ifd) & ~explained
        pairs = decoy_pairs(content_keys(rows), eligible, fit.decoy_rows)
        decoy, estimate["cost"] = decoy_losses(rows.frame, rows.task, rows.model_dir, pairs, rows.cache_dir,
                                               batch_size=fit.batch_size, max_tokens=fit.max_tokens)
        without_of = np.array([without[i] for i, _ in pairs], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            decoy_gain = (1.0 - decoy / without_of) / (1.0 - median_ifd)
        gain_cut, precision, more = flag_threshold(relative_gain, eligible, decoy_gain, fit.max_relative_gain,
                                                   fit.min_estimated_precision)
        estimate |= more
        if gain_cut is not None:
            hit &= np.nan_to_num(relative_gain, nan=np.inf) <= gain_cut
    if candidates and not precision >= fit.min_estimated_precision:  # (NaN: no estimate, nothing flagged)
        hit[:] = False
    warn = candidate & ~hit
    reasons = _none(len(rows))
    for i in np.flatnonzero(hit | warn):
        cut = estimate.get("flag_relative_gain")
        why_not = ("" if hit[i] else f"possibly misaligned, not flagged (estimated precision {precision:.2f} < "
                   f"{fit.min_estimated_precision}): " if cut is None else
                   f"possibly misaligned, not flagged (flags stop at {cut:.0%} of the median row's gain, where the "
                   f"estimated precision reaches {fit.min_estimated_precision}): ")
        reasons[i] = (why_not
                      + f"the response barely follows from its prompt: the base model's loss on it is {with_p[i]:.2f} "
                      f"nats/token with the prompt and {without[i]:.2f} without (IFD {ifd[i]:.2f}; the dataset's median "
                      f"row {median_ifd:.2f}: this row gains {max(relative_gain[i], 0):.0%} of its gain)")
    info = {"max_relative_gain": fit.max_relative_gain, "median_ifd": _r(median_ifd),
            "ifd_threshold": _r(1 - fit.max_relative_gain * (1 - median_ifd)) if informative else None,
            "flagged_below_relative_gain": estimate.get("flag_relative_gain"),
            "rows_explained_by_other_findings": int(explained.sum()), "candidates": candidates,
            "estimated_precision": _r(precision), "min_estimated_precision": fit.min_estimated_precision, "cost": cost,
            "decoy_estimate": estimate,
            "estimate": "model-estimated from decoys (responses after another row's prompt): the misaligned rows "
                        "expected among the candidates / the candidates; the same for every flag"}
    if candidates and not hit.any():
        info["status"] = "abstained"
        info["why"] = (f"{candidates} rows gain at most {fit.max_relative_gain:.0%} of the median row's gain from their "
                       f"prompt, but few look like misaligned pairs (estimated precision {precision:.2f} < "
                       f"{fit.min_estimated_precision}): none is flagged; they rank first by fit_relative_gain")
    if not informative:
        info["status"] = "abstained"
        info["why"] = (f"the base model gains almost nothing from the prompts on the median row (median IFD "
                       f"{median_ifd if median_ifd is None else round(median_ifd, 3)} > {MAX_MEDIAN_IFD}): it cannot "
                       "tell a misaligned pair from an aligned one here")
    return FindingResult(hit, np.where(hit, precision, np.nan), reasons,
                         {"fit_loss_with_prompt": with_p, "fit_loss_without_prompt": without, "fit_ifd": ifd,
                          "fit_relative_gain": relative_gain}, info,
                         suspicion=np.clip(1.0 - np.nan_to_num(relative_gain, nan=1.0), 0.0, 1.0), warn=warn)


def language_ranks(rows: Rows, which: str, extra: tuple[str, ...]) -> list[dict[str, float]]:
    """py3langid's probabilities of each row's prompt or response over the plausible languages + `extra`."""
    from ..langid import identifier

    languages = tuple(sorted(set(PLAUSIBLE_LANGUAGES) | {x for x in extra if x}))
    key = (which, languages)
    if key not in rows.memo:
        ident = identifier(languages)
        texts = rows.prompts if which == "prompt" else rows.responses
        rows.memo[key] = [dict(ident.rank(t)) if t.strip() else {} for t in texts]
    return rows.memo[key]


def _top(ranks: dict[str, float]) -> tuple[str | None, float]:
    return max(ranks.items(), key=lambda kv: kv[1]) if ranks else (None, 0.0)


def _dominant(ranks: list[dict[str, float]], share: float) -> tuple[str | None, float]:
    """The language of at least `share` of the confidently identified texts, and its share."""
    confident = [lang for lang, p in map(_top, ranks) if lang is not None and p >= CONFIDENT]
    if not confident:
        return None, 0.0
    lang, count = Counter(confident).most_common(1)[0]
    return (lang if count / len(confident) >= share else None), count / len(confident)


def _language_name(code: str | None) -> str:
    return LANGUAGE_NAMES.get(code or "", code or "unknown")


@finding("wrong_language", "the response (or, for translation, the prompt) is not in the expected language",
         explained_by=("copy",))
def wrong_language(rows: Rows) -> FindingResult:
    task, cfg = rows.task, rows.cfg.language
    n = len(rows)
    extra = (task.response_language, task.prompt_language)
    response_ranks = language_ranks(rows, "response", extra)
    info: dict = {"min_probability": cfg.min_probability, "max_expected_probability": cfg.max_expected_probability,
                  "estimate": "model-estimated: 1 - py3langid's probability of the expected language"}
    expected: list[str | None]
    if task.response_language:
        expected, why = [task.response_language] * n, [f"task.response_language is {task.response_language}"] * n
        info["expected"] = task.response_language
    else:
        dominant, share = _dominant(response_ranks, cfg.dominant_share)
        info["dominant_response_language"], info["dominant_share"] = dominant, round(share, 4)
        dominant_why = f"the dataset's responses are {share:.0%} {_language_name(dominant)} ({dominant})"
        if task.type == "translation":
            expected, why = [dominant] * n, [dominant_why] * n
        else:  # a response is expected in its prompt's language (a French question answered in French)
            prompt_top = [_top(r) for r in language_ranks(rows, "prompt", extra)]
            expected = [lang if p >= CONFIDENT else dominant for lang, p in prompt_top]
            why = [f"its prompt is in {_language_name(lang)} ({lang}, p={p:.2f})" if p >= CONFIDENT else dominant_why
                   for lang, p in prompt_top]
        if not any(expected):
            info["status"] = "abstained"
            info["why"] = "no task.response_language, and no language holds the dataset's responses " \
                          f"({share:.0%} at most, {cfg.dominant_share:.0%} needed)"
    explained = rows.memo["explained"]  # an untranslated copy is reported as a copy
    detected, p_detected, p_expected, hit, reasons = [], _nan(n), _nan(n), np.zeros(n, dtype=bool), _none(n)
    for i, (ranks, want) in enumerate(zip(response_ranks, expected)):
        lang, p = _top(ranks)
        detected.append(lang)
        p_detected[i] = p
        if want is None or lang is None or explained[i]:
            continue
        p_expected[i] = ranks.get(want, 0.0)
        if lang != want and p >= cfg.min_probability and p_expected[i] <= cfg.max_expected_probability:
            hit[i] = True
            reasons[i] = (f"the response is in {_language_name(lang)} ({lang}, p={p:.2f}); {why[i]}, "
                          f"p({want})={p_expected[i]:.2f}")
    columns = {"response_language": detected, "response_language_probability": p_detected,
               "expected_language_probability": p_expected}
    probability = 1.0 - p_expected
    # for ranking: how sure another language was detected (a short, ambiguous text stays low)
    suspicion = np.where([d != w for d, w in zip(detected, expected)], np.nan_to_num(p_detected * probability), 0.0)
    if task.type == "translation" or task.prompt_language:
        prompt_ranks = language_ranks(rows, "prompt", extra)
        want = task.prompt_language
        if want is None:
            want, share = _dominant(prompt_ranks, cfg.dominant_share)
            info["dominant_prompt_language"] = want
            why_prompt = f"the dataset's prompts are {share:.0%} {_language_name(want)} ({want})"
        else:
            why_prompt = f"task.prompt_language is {want}"
        prompt_detected, prompt_expected = [], _nan(n)
        for i, ranks in enumerate(prompt_ranks):
            lang, p = _top(ranks)
            prompt_detected.append(lang)
            if want is None or lang is None or explained[i]:
                continue
            prompt_expected[i] = ranks.get(want, 0.0)
            if lang != want and p >= cfg.min_probability and prompt_expected[i] <= cfg.max_expected_probability:
                sentence = (f"the prompt is in {_language_name(lang)} ({lang}, p={p:.2f}); {why_prompt}, "
                            f"p({want})={prompt_expected[i]:.2f}")
                reasons[i] = f"{reasons[i]}; {sentence}" if hit[i] else sentence
                hit[i] = True
                probability[i] = np.nanmax([probability[i], 1.0 - prompt_expected[i]])
                suspicion[i] = max(suspicion[i], p * (1.0 - prompt_expected[i]))
        columns |= {"prompt_language": prompt_detected, "prompt_expected_language_probability": prompt_expected}
    return FindingResult(hit, probability, reasons, columns, info, suspicion=suspicion)


def normalized(text: str) -> str:
    """Lower case, compatibility-normalised, punctuation and spacing collapsed to single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def _similarity(a: str, b: str) -> float:
    """difflib's ratio of the normalised texts (characters; words above SIMILARITY_MAX_CHARS). Below 0.5 it
    may be the length bound `real_quick_ratio` instead (an upper bound: far from any copy threshold)."""
    if max(len(a), len(b)) > SIMILARITY_MAX_CHARS:
        a, b = a.split(), b.split()
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    bound = matcher.real_quick_ratio()
    return matcher.ratio() if bound > 0.5 else bound


def _chunk_share(prompt: str, response: str) -> float:
    """The share of the response that is one contiguous piece of the prompt (normalised texts)."""
    if not response or not prompt:
        return 0.0
    matcher = difflib.SequenceMatcher(None, prompt, response, autojunk=False)
    return matcher.find_longest_match(0, len(prompt), 0, len(response)).size / len(response)


@finding("copy", "the response is a copy of the prompt, or of one chunk of it")
def copy(rows: Rows) -> FindingResult:
    cfg = rows.cfg.copied
    n = len(rows)
    prompts = [normalized(p) for p in rows.prompts]
    responses = [normalized(r) for r in rows.responses]
    similarity = np.array([_similarity(p, r) if r else 0.0 for p, r in zip(prompts, responses)])
    chunk = np.array([_chunk_share(p, r) if len(r.split()) >= cfg.min_words and len(r) < len(p) else 0.0
                      for p, r in zip(prompts, responses)])
    median_similarity, median_chunk = float(np.median(similarity)) if n else 0.0, float(np.median(chunk)) if n else 0.0
    echo_on, chunk_on = median_similarity < COPY_NORM_MAX, median_chunk < COPY_NORM_MAX
    echo = echo_on & (similarity >= cfg.min_similarity) & np.array([bool(r) for r in responses])
    piece = chunk_on & (chunk >= cfg.min_similarity) & ~echo
    reasons = _none(n)
    for i in np.flatnonzero(echo):
        reasons[i] = (f"the response is a copy of the prompt (similarity {similarity[i]:.2f} after lower-casing and "
                      f"removing punctuation; the dataset's median is {median_similarity:.2f})")
    for i in np.flatnonzero(piece):
        reasons[i] = (f"the response is one chunk copied out of the prompt ({chunk[i]:.0%} of it is one contiguous "
                      f"piece of the prompt; the dataset's median is {median_chunk:.0%})")
    info = {"min_similarity": cfg.min_similarity, "min_words": cfg.min_words,
            "median_similarity": round(median_similarity, 4), "median_chunk_share": round(median_chunk, 4),
            "echo_rule": "on" if echo_on else "off: responses resemble their prompts by design",
            "chunk_rule": "on" if chunk_on else "off: responses are spans of their prompts by design",
            "estimate": "the copied share itself (a rule, not calibrated)"}
    if not (echo_on or chunk_on):
        info["status"] = "abstained"
        info["why"] = "copying the prompt is this dataset's norm"
    copied = np.where(echo, similarity, np.where(piece, chunk, np.maximum(similarity * echo_on, chunk * chunk_on)))
    return FindingResult(echo | piece, copied, reasons, {"copy_similarity": similarity, "copy_chunk_share": chunk},
                         info, suspicion=np.clip((copied - COPY_NORM_MAX) / (1 - COPY_NORM_MAX), 0.0, 1.0))


def length_stats(rows: Rows) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(response chars, prompt chars, log ratio, its robust z, median log ratio), computed once."""
    if "length" not in rows.memo:
        r_len = np.array([len(r.strip()) for r in rows.responses], dtype=float)
        p_len = np.array([len(p.strip()) for p in rows.prompts], dtype=float)
        ratio = np.log((r_len + 1) / (p_len + 1))
        z, median, _ = robust_z(ratio)
        rows.memo["length"] = (r_len, p_len, ratio, z, median)
    return rows.memo["length"]


@finding("length", "the response's length is far out of line with its prompt's, for this dataset",
         explained_by=("copy", "truncated", "wrong_language", "misaligned"))
def length(rows: Rows) -> FindingResult:
    cfg = rows.cfg.length
    r_len, p_len, ratio, z, median = length_stats(rows)
    hit = (np.abs(z) >= cfg.max_z) & ~rows.memo["explained"]
    reasons = _none(len(rows))
    for i in np.flatnonzero(hit):
        side = "long" if z[i] > 0 else "short"
        reasons[i] = (f"the response is {side} for its prompt: {int(r_len[i])} characters for {int(p_len[i])} "
                      f"(ratio {np.exp(ratio[i]):.2f}; the dataset's median ratio is {np.exp(median):.2f}, robust z "
                      f"{z[i]:.1f})")
    info = {"max_z": cfg.max_z, "median_ratio": _r(float(np.exp(median))) if np.isfinite(median) else None,
            "estimate": "model-estimated: 1 - Benjamini-Hochberg q-value of the robust z (normal null, two-sided)"}
    estimate = tail_precision(z, two_sided=True)
    return FindingResult(hit, estimate, reasons, {"length_log_ratio": ratio, "length_z": z}, info,
                         suspicion=np.nan_to_num(estimate, nan=0.0))


def _ending(text: str) -> str:
    return text.rstrip().rstrip(CLOSERS).rstrip()


@finding("truncated", "the response ends mid-sentence", explained_by=("copy",))
def truncated(rows: Rows) -> FindingResult:
    cfg = rows.cfg.truncation
    n = len(rows)
    short = length_stats(rows)[3] <= TRUNCATED_MAX_LENGTH_Z
    ends = [_ending(r) if not rows.memo["explained"][i] else "" for i, r in enumerate(rows.responses)]
    # each response's language (detected when sure, else the task's): which function words dangle
    ranks = language_ranks(rows, "response", (rows.task.response_language, rows.task.prompt_language))
    languages = [lang if p >= rows.cfg.language.min_probability else rows.task.response_language
                 for lang, p in map(_top, ranks)]
    terminal = np.array([bool(e) and e[-1] in TERMINAL for e in ends])
    share = float(terminal[[bool(e) for e in ends]].mean()) if any(ends) else 0.0
    punctuation_rule = share >= cfg.min_terminal_share
    hit, kinds, reasons = np.zeros(n, dtype=bool), [""] * n, _none(n)
    for i, e in enumerate(ends):
        if not e:
            continue
        last_word = e.split()[-1].lower() if e.split() else ""
        if e[-1] in DANGLING_PUNCTUATION:
            kinds[i], reasons[i] = "dangling_punctuation", f"the response ends on {e[-1]!r}: it stops mid-sentence"
        elif last_word in DANGLING_WORDS.get(languages[i] or "", ()) and not terminal[i]:
            kinds[i], reasons[i] = "dangling_word", f"the response ends on {last_word!r}: it stops mid-sentence"
        elif punctuation_rule and not terminal[i] and short[i]:
            kinds[i] = "no_terminal_punctuation"
            reasons[i] = (f"the response ends without terminal punctuation (…{e[-20:]!r}) where {share:.0%} of the "
                          "dataset's responses have it, and is short for its prompt")
        hit[i] = bool(kinds[i])
    info = {"terminal_share": round(share, 4), "min_terminal_share": cfg.min_terminal_share,
            "punctuation_rule": "on" if punctuation_rule else "off: the dataset's responses often end without it",
            "estimate": "none (a rule)"}
    return FindingResult(hit, _nan(n), reasons, {"truncated_end": kinds}, info)


@finding("boilerplate", "a refusal or assistant filler (\"As an AI language model\", \"Sure! Here is\")")
def boilerplate(rows: Rows) -> FindingResult:
    n = len(rows)
    matched, reasons = [""] * n, _none(n)
    for i, r in enumerate(rows.responses):
        for pattern, what in BOILERPLATE:
            m = pattern.search(r)
            if m:
                matched[i], reasons[i] = what, f"the response contains {what}: {m.group(0).strip()!r}"
                break
    hit = np.array([bool(m) for m in matched])
    return FindingResult(hit, _nan(n), reasons, {"boilerplate_match": matched}, {"estimate": "none (a rule)"})


def _r(value, digits: int = 4):
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


# ---------------------------------------------------------------------------------------------------
# The report


@dataclass
class ResponseIssueReport:
    flags: pd.DataFrame
    summary: dict

    def gate_outcomes(self, cfg: ResponseQualitySpec) -> list[CheckOutcome]:
        return response_gate_outcomes(self.flags, self.summary, cfg)


def find_response_issues(df: pd.DataFrame, task: TaskSpec, cfg: ResponseQualitySpec, model_dir: Path | None = None,
                         cache_dir: Path | None = None) -> pd.DataFrame:
    """One row per row of `df` (same order), keyed by `example_id`: `is_response_issue` (a blocking finding
    hit, the row not reviewed), `is_response_warning`, `response_issue_types` (comma-joined kinds hit),
    `response_issue_score` (every row, for ranking; higher = worse: a flagged row its largest estimate, at least
    0.5; any other row half its largest suspicion, below 0.5), `response_issue_probability` (the flagged rows'
    estimate), `response_issue_reason` (flagged and warned rows),
    `estimated_precision_at_rank` (model-estimated; see the module docstring) and each finding's raw score
    columns. The summary is in `.attrs["summary"]` (and `response_issue_report`).

    df: prompt, response (and optional system, history, reviewed); model_dir: the base model's directory
    (needed by `misaligned`); cache_dir: where that finding caches its per-row losses.
    """
    return response_issue_report(df, task, cfg, model_dir=model_dir, cache_dir=cache_dir).flags


def response_issue_report(df: pd.DataFrame, task: TaskSpec, cfg: ResponseQualitySpec, model_dir: Path | None = None,
                          cache_dir: Path | None = None) -> ResponseIssueReport:
    frame = df.reset_index(drop=True)
    n = len(frame)
    flags = pd.DataFrame({"example_id": frame["example_id"].astype(str)})
    if task.is_label_task:
        raise ValueError(f"response findings are for generation tasks, not {task.type}")
    if not cfg.enabled:
        summary = {"enabled": False, "status": DISABLED, "n_rows": n, "findings": {}, "issue_count": 0,
                   "issue_rate": None, "warning_count": 0}
        return ResponseIssueReport(_assemble(flags, frame, {}, cfg), summary)
    rows = Rows(frame, task, cfg, Path(model_dir) if model_dir is not None else None,
                Path(cache_dir) if cache_dir is not None else None,
                frame["prompt"].fillna("").astype(str).tolist(), frame["response"].fillna("").astype(str).tolist(), {})
    results: dict[str, FindingResult] = {}
    summary_findings: dict[str, dict] = {}
    reviewed = _reviewed(frame).to_numpy()
    for kind in run_order(cfg.findings):
        start = time.perf_counter()
        explainers = [results[k].hit & ~reviewed for k in FINDINGS[kind].explained_by if k in results]
        rows.memo["explained"] = np.any(explainers, axis=0) if explainers else np.zeros(n, dtype=bool)
        try:
            result = FINDINGS[kind].run(rows)
        except NotEvaluated as exc:
            summary_findings[kind] = {"status": "not evaluated", "why": str(exc)}
            continue
        results[kind] = result
        summary_findings[kind] = {"status": "run", **result.info, "flagged": int(result.hit.sum()),
                                  "blocking": kind not in cfg.warnings,
                                  "seconds": round(time.perf_counter() - start, 3)}
    results = {k: results[k] for k in cfg.findings if k in results}  # the spec's order
    summary_findings = {k: summary_findings[k] for k in cfg.findings}
    flags = _assemble(flags, frame, results, cfg)
    issue = flags["is_response_issue"]
    summary = {"enabled": True, "n_rows": n, "findings": summary_findings,
               "findings_expected": list(cfg.findings),
               "not_evaluated": [k for k, v in summary_findings.items() if v["status"] == "not evaluated"],
               "abstained": [k for k, v in summary_findings.items() if v["status"] == "abstained"],
               "issue_count": int(issue.sum()), "issue_rate": round(float(issue.mean()), 6) if n else 0.0,
               "warning_count": int(flags["is_response_warning"].sum()),
               "by_kind": {k: int(r.hit.sum()) for k, r in results.items()},
               "reviewed_rows_not_flagged": int(_reviewed(frame).sum())}
    running = flags.sort_values("response_issue_score", ascending=False, kind="stable")
    running = running.loc[running["is_response_issue"], "estimated_precision_at_rank"].to_numpy()
    summary["estimated_precision_top"] = {str(k): _r(running[k - 1]) for k in PRECISION_AT if k <= len(running)}
    if len(running):
        summary["estimated_precision_top"][f"all_{len(running)}"] = _r(running[-1])
    flags.attrs["summary"] = summary
    return ResponseIssueReport(flags, summary)


def run_order(kinds: list[str]) -> list[str]:
    """The findings in an order where each runs after the findings that explain it."""
    done: list[str] = []
    pending = list(kinds)
    while pending:
        ready = [k for k in pending if all(e in done or e not in kinds for e in FINDINGS[k].explained_by)]
        if not ready:
            raise ValueError(f"response findings explain each other in a cycle: {pending}")
        done += ready
        pending = [k for k in pending if k not in ready]
    return done


def _reviewed(frame: pd.DataFrame) -> pd.Series:
    return frame["reviewed"].fillna(False).astype(bool) if "reviewed" in frame else pd.Series(False, index=frame.index)


def _assemble(flags: pd.DataFrame, frame: pd.DataFrame, results: dict[str, FindingResult],
              cfg: ResponseQualitySpec) -> pd.DataFrame:
    n = len(frame)
    reviewed = _reviewed(frame).to_numpy()
    kinds = list(results)
    hits = {k: results[k].hit.astype(bool) & ~reviewed for k in kinds}
    blocking = [k for k in kinds if k not in cfg.warnings]
    warning = [k for k in kinds if k in cfg.warnings]
    warned = {k: (hits[k] if k in cfg.warnings else np.zeros(n, dtype=bool))
              | (results[k].warn.astype(bool) & ~reviewed if results[k].warn is not None else False) for k in kinds}
    flags["is_response_issue"] = np.any([hits[k] for k in blocking], axis=0) if blocking else np.zeros(n, dtype=bool)
    flags["is_response_warning"] = np.any(list(warned.values()), axis=0) if kinds else np.zeros(n, dtype=bool)
    flags["response_issue_types"] = [",".join(k for k in kinds if hits[k][i] or warned[k][i]) for i in range(n)]
    # Hits score their estimate (a rule's hit RULE_HIT_SCORE), at least 0.5; every other row half its
    # largest suspicion, below 0.5: the flagged rows rank first, the rest by how suspect they look.
    blocking_scores = [np.where(hits[k], np.maximum(np.nan_to_num(results[k].probability, nan=RULE_HIT_SCORE), 0.5),
                                0.5 * np.clip(results[k].suspicion if results[k].suspicion is not None else 0.0, 0, 0.999))
                       for k in blocking]
    score = np.max(blocking_scores, axis=0) if blocking_scores else np.zeros(n)
    flags["response_issue_score"] = np.round(score, 6)
    hit_probability = [np.where(hits[k], results[k].probability, np.nan) for k in blocking]
    with np.errstate(all="ignore"):
        probability = np.fmax.reduce(hit_probability, axis=0) if hit_probability else _nan(n)
    flags["response_issue_probability"] = np.round(probability, 6)
    flags["response_issue_reason"] = pd.Series(
        ["; ".join(results[k].reasons[i] for k in kinds if (hits[k][i] or warned[k][i]) and results[k].reasons[i])
         or None for i in range(n)], dtype="string")
    order = np.argsort(-score, kind="stable")
    at_rank = np.full(n, np.nan)
    at_rank[order] = running_precision(flags["is_response_issue"].to_numpy()[order], probability[order])
    flags["estimated_precision_at_rank"] = np.round(at_rank, 4)
    for k in kinds:
        for name, values in results[k].columns.items():
            flags[name] = values
    return flags


def response_gate_outcomes(flags: pd.DataFrame, summary: dict, cfg: ResponseQualitySpec) -> list[CheckOutcome]:
    """Blocking: the share of rows with a blocking finding within `max_issue_rate`; every enabled finding
    evaluated. Warning: warning findings (boilerplate) hit, or findings that abstained."""
    if summary.get("enabled") is False:
        return [CheckOutcome(name, True, blocking, DISABLED, {"enabled": False})
                for name, blocking, _ in RESPONSE_GATE_CHECKS]
    rate = summary.get("issue_rate")
    issue = flags["is_response_issue"].astype(bool) if "is_response_issue" in flags else pd.Series(dtype=bool)
    ranked = flags[issue].sort_values("response_issue_score", ascending=False) if len(issue) else flags.head(0)
    shown = ranked[["example_id", "response_issue_types", "response_issue_score", "response_issue_reason"]].head(20) \
        if len(ranked) else pd.DataFrame()
    missing = list(summary.get("not_evaluated", [])) if "findings" in summary else ["<unknown>"]
    expected = summary.get("findings_expected", [])
    evaluated = rate is not None and not missing
    by_kind = summary.get("by_kind", {})
    warnings_hit = {k: by_kind.get(k, 0) for k in cfg.warnings if by_kind.get(k)}
    abstained = {k: summary["findings"][k].get("why", "") for k in summary.get("abstained", [])}
    return [
        CheckOutcome(
            "response_issue_rate", evaluated and rate <= cfg.max_issue_rate, True,
            f"response issue rate {rate:.4f} vs the allowed {cfg.max_issue_rate} ("
            + ", ".join(f"{k} {v}" for k, v in by_kind.items() if k not in cfg.warnings) + ")" if evaluated
            else f"response findings {missing} were not evaluated: a skipped check is a failed gate",
            {"response_issue_rate": rate, "response_issue_count": summary.get("issue_count"),
             "max_issue_rate": cfg.max_issue_rate, "by_kind": by_kind},
            failing_ids=ranked["example_id"].astype(str).tolist(), failing_rows=shown),
        CheckOutcome(
            "response_findings_evaluated", not missing, True,
            "every enabled response finding was evaluated" if not missing
            else "not evaluated: " + "; ".join(f"{k} ({summary['findings'].get(k, {}).get('why', 'missing')})"
                                              for k in missing) + ": a skipped check is a failed gate",
            {"expected": expected, "not_evaluated": missing, "abstained": list(abstained)}),
        CheckOutcome(
            "response_warnings", not warnings_hit and not abstained, False,
            "no warning finding hit and every finding could decide" if not warnings_hit and not abstained
            else "; ".join([f"{v} rows with {k}" for k, v in warnings_hit.items()]
                           + [f"{k} abstained: {why}" for k, why in abstained.items()]),
            {"warnings": warnings_hit, "abstained": abstained}),
    ]


RESPONSE_GATE_CHECKS = [
    CheckDef("response_issue_rate", True, "Share of rows with a blocking response finding (misaligned, wrong language, copy, "
                                  "length, truncated) is within quality.response.max_issue_rate"),
    CheckDef("response_findings_evaluated", True, "Every enabled response finding was evaluated (a skipped one is a failure)"),
    CheckDef("response_warnings", False, "Warning findings (boilerplate) and findings that could not decide on this data"),
]
