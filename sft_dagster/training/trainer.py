"""The shared training loop (`run_training`): what every method shares. What each method does
differently lives in `methods/` (SFT with LoRA, QLoRA or full fine-tuning, the reward model, DPO, PPO's
policy); `methods.sft.train` is SFT. The torch building blocks (collation, losses at the loss
positions, device, precision) are in `sft_dagster.torchkit`.

The loop is a recipe in torchtune's shape (`_Recipe`): `_setup_*` steps (process, data, precision,
model, optimizer, batches, checkpoints), one optimizer step per accumulation window (`_train_window`),
validation with early stopping (`_validate`), and `finish` (best weights, save, metrics).

What makes it fast on a small CPU: batches grouped by length (little padding), and vocabulary logits
computed only where a token carries loss (the prompt never goes through the 49k-wide output layer).
What makes it safe: examples that would be truncated are refused, the loss is normalised by the loss
tokens of the whole accumulation window (so batch 8 x 1 equals batch 1 x 8), validation loss drives
early stopping and the best weights are kept, and checkpoints every N steps let a killed run resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import atomic
from ..formatting import pad_id as pad_id_of
from ..progress import Progress
from ..spec import PipelineSpec
from ..torchkit import HeapReleaser, autocast, pick_device, release_freed_memory_to_os
from .precision import PrecisionChoice

CHECKPOINTS_KEPT = 2


@dataclass
class TrainingResult:
    adapter_dir: Path
    method: str
    metrics: dict = field(default_factory=dict)


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Sum gradients over ranks: each rank's loss is already divided by the global token count."""
    import torch.distributed as dist

    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches: similar lengths share a batch."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def split_by_token_budget(micro: list[int], lengths: list[int], budget: int, size) -> list[list[int]]:
    """Halve a micro-batch (sorted by length) until each piece's `size` (the token slots its collated
    batch holds: `TrainingMethod.batch_tokens`) fits the budget."""
    if len(micro) <= 1 or size(micro) <= budget:
        return [micro]
    ordered = sorted(micro, key=lambda i: lengths[i])
    half = len(ordered) // 2
    return split_by_token_budget(ordered[:half], lengths, budget, size) + split_by_token_budget(ordered[half:], lengths,
                                                                                                budget, size)


def _resolve_precision_on_rank0(method, model_dir, device, train_set, pad_id, probe_cache, rank: int,
                                world: int) -> PrecisionChoice:
    """Rank 0 resolves (and if need be measures) the precision alone; the other ranks take its choice."""
    if world == 1:
        return method.resolve_precision(model_dir, device, train_set, pad_id, probe_cache)
    import torch.distributed as dist

    box = [method.resolve_precision(model_dir, device, train_set, pad_id, probe_cache) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_fingerprint(spec: PipelineSpec, method, train: list, model_dir: Path, precision: str) -> str:
    h = hashlib.sha256(json.dumps(spec.training.model_dump(mode="json"), sort_keys=True).encode())
    if identity := method.identity():  # SFT adds nothing: its fingerprints are the ones it always had
        h.update(json.dumps(identity, sort_keys=True, default=str).encode())
    h.update(str(model_dir).encode())
    h.update(precision.encode())  # `auto` may resolve differently on another machine: not the same run
    for e in train:
        h.update(bytes(method.item_key(e), "ascii"))
    return h.hexdigest()[:16]


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def _save_checkpoint(ckpt_root: Path, step: int, model, optimizer, scheduler, state: dict) -> None:
    # Replaces a stale checkpoint of another run (other fingerprint) with the same step number.
    with atomic.atomic_dir(ckpt_root / f"step-{step}") as tmp:
        torch.save({"trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state))
    for old in sorted(ckpt_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path, fingerprint: str) -> Path | None:
    candidates = sorted(ckpt_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for path in candidates:
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("fingerprint") == fingerprint:
            return path
    return None


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: str) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per parameter on CPU and CUDA.

    torch's default on CPU is a Python loop of ~10 operations per parameter: for SmolLM2's 420 LoRA
    matrices (4.9M values) the clipped step took 120-510 ms against 18-59 ms fused, three runs each
    on the loaded 2-core development machine (BENCHMARKS.md); the updates differ by float rounding
    only (max 3e-8 after one step).
    """
    fused = torch.device(device).type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def optimizer_steps(n_examples: int, spec: PipelineSpec) -> int:
    t = spec.training
    per_epoch = math.ceil(math.ceil(n_examples / t.batch_size) / t.gradient_accumulation_steps)
    total = math.ceil(per_epoch * t.epochs)
    return min(total, t.max_steps) if t.max_steps else total


def run_training(method, spec: PipelineSpec, model_dir: Path, train_data, val_data, output_dir: Path,
                 device: str = "auto", log: Callable[[str], None] = print,
                 on_metrics: Callable[[dict], None] | None = None, stop_after_steps: int | None = None,
                 probe_cache: Path | str | None = None) -> TrainingResult:
    """The shared loop: train `method` (a `methods.base.TrainingMethod`) on `train_data`, keep the weights
    with the best validation loss, save `output_dir / method.output_name`; resumes from its checkpoints.

    `stop_after_steps` ends the run early without saving the final model (used to test resuming).
    `probe_cache`: where `precision: auto` caches its measurement (default: see `precision.probe_cache_dir`).
    """
    recipe = _Recipe(method, spec, model_dir, Path(output_dir), log, on_metrics or Progress(log))
    recipe.setup(train_data, val_data, device, probe_cache)
    if not recipe.train(stop_after_steps):
        return TrainingResult(adapter_dir=recipe.output_dir, method=method.name, metrics=dict(recipe.state))
    return recipe.finish()


class _Recipe:
    """One run of `run_training`: set up, train window by window, finish."""

    def __init__(self, method, spec: PipelineSpec, model_dir: Path, output_dir: Path, log, on_metrics):
        self.method, self.spec, self.cfg = method, spec, spec.training
        self.model_dir, self.output_dir, self.log, self.on_metrics = model_dir, output_dir, log, on_metrics
        self.early_stopped = False

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self, train_data, val_data, device: str, probe_cache) -> None:
        self._setup_process(device)
        self._setup_data(train_data, val_data)
        self._setup_precision(probe_cache)
        self._setup_model()
        self._setup_optimizer()
        self._setup_batches()
        self._setup_checkpoints()

    def _setup_process(self, device: str) -> None:
        """Rank and world size, this rank's device, the seeds."""
        self.rank, self.world = distributed()
        device = pick_device(device)
        if device == "cuda" and self.world > 1:
            device = f"cuda:{self.rank % torch.cuda.device_count()}"
        self.device = device
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)

    def _setup_data(self, train_data, val_data) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.pad_id = pad_id_of(self.tokenizer)
        self.train_set = self.method.encode_train(self.tokenizer, train_data)
        self.val_set = self.method.encode(self.tokenizer, val_data)
        if not self.train_set:
            raise ValueError("the train split is empty")

    def _setup_precision(self, probe_cache) -> None:
        """The run's precision (rank 0 measures it if need be) and what autocast is given."""
        self.choice = _resolve_precision_on_rank0(self.method, self.model_dir, self.device, self.train_set,
                                                  self.pad_id, probe_cache, self.rank, self.world)
        self.precision = self.choice.precision
        self.amp = self.precision if self.method.uses_autocast(self.precision) else "fp32"
        cached = " (cached measurement)" if self.choice.cached else ""
        self.log(f"precision {self.precision}: {self.choice.reason}{cached}")

    def _setup_model(self) -> None:
        on_cpu = not self.device.startswith("cuda")
        if on_cpu:
            release_freed_memory_to_os()
        self.model = self.method.load_model(self.model_dir, self.device, self.precision)
        self.model.train()
        self.method.prepare(self.model, self.train_set, self.val_set, self.pad_id, self.device, self.amp, self.log)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.heap = HeapReleaser() if on_cpu else None

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        cfg = self.cfg
        self.optimizer = make_optimizer(self.params, cfg.learning_rate, cfg.weight_decay, self.device)
        self.total_steps = optimizer_steps(len(self.train_set), self.spec)
        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer,
                                       num_warmup_steps=int(cfg.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)

    def _setup_batches(self) -> None:
        """Each item's padded length, loss weight and tokens; the micro-batches of an epoch."""
        method, items = self.method, self.train_set
        self.lengths = [method.length(e) for e in items]
        self.weights = [method.weight(e) for e in items]
        self.tokens = [method.tokens(e) for e in items]
        micro_per_epoch = length_grouped_batches(self.lengths, self.cfg.batch_size, self.cfg.seed)
        self.steps_per_epoch = math.ceil(len(micro_per_epoch) / self.cfg.gradient_accumulation_steps)
        self.eval_every = self.cfg.eval_every_steps or self.steps_per_epoch

    def _setup_checkpoints(self) -> None:
        """The run's state, from its latest checkpoint when one of the same run exists."""
        self.ckpt_root = self.output_dir / "checkpoints"
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        fingerprint = _run_fingerprint(self.spec, self.method, self.train_set, self.model_dir, self.precision)
        self.state = {"fingerprint": fingerprint, "step": 0, "trained_tokens": 0, "best_val": None, "bad_evals": 0,
                      "val_history": [], "train_loss": None, "seconds": 0.0, "validation_seconds": 0.0}
        self.resumed_from = None
        self.best_path = self.output_dir / "best_trainable.pt"
        if (ckpt := latest_checkpoint(self.ckpt_root, fingerprint)) is not None:
            saved = torch.load(ckpt / "state.pt", weights_only=True)  # tensors and plain containers only
            _load_trainable(self.model, saved["trainable"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            torch.set_rng_state(saved["torch_rng"])
            self.state = json.loads((ckpt / "trainer_state.json").read_text())
            self.resumed_from = self.state["step"]
            self.log(f"resuming from checkpoint {ckpt.name}")
        else:
            self.best_path.unlink(missing_ok=True)

    # -- training ------------------------------------------------------------------------------------
    def train(self, stop_after_steps: int | None) -> bool:
        """Optimizer steps until the planned total or early stopping; False if `stop_after_steps` ended it."""
        cfg, state = self.cfg, self.state
        self.start_time = time.perf_counter() - state["seconds"]
        while state["step"] < self.total_steps and not self.early_stopped:
            epoch, offset = divmod(state["step"], self.steps_per_epoch)
            batches = length_grouped_batches(self.lengths, cfg.batch_size, cfg.seed + epoch)
            windows = [batches[i : i + cfg.gradient_accumulation_steps]
                       for i in range(0, len(batches), cfg.gradient_accumulation_steps)]
            for window in windows[offset:]:
                self._train_window(window)
                step = state["step"]
                step_stats = self.method.pop_stats()
                evaluates = step % self.eval_every == 0 or step == self.total_steps
                val, val_stats = self._validate() if evaluates else (None, {})
                self._report(step_stats, val, val_stats)
                if self.rank == 0 and (step % cfg.checkpoint_every_steps == 0 or self.early_stopped
                                       or step == self.total_steps):
                    _save_checkpoint(self.ckpt_root, step, self.model, self.optimizer, self.scheduler, state)
                if stop_after_steps is not None and step >= stop_after_steps:
                    return False
                if self.early_stopped or step >= self.total_steps:
                    break
        return True

    def _train_window(self, window: list[list[int]]) -> None:
        """One optimizer step over an accumulation window: each rank its share of the micro-batches, each
        split under the token budget, the loss normalised by the whole window's weight."""
        method, cfg, state = self.method, self.cfg, self.state
        window_weight = sum(self.weights[i] for micro in window for i in micro)
        piece_size = lambda piece: method.batch_tokens([self.train_set[i] for i in piece])
        pieces = [piece for micro in window[self.rank :: self.world]
                  for piece in split_by_token_budget(micro, self.lengths, cfg.max_tokens_per_micro_batch, piece_size)]
        with autocast(self.device, self.amp):  # work on the whole window before its first micro-batch (KTO's KL)
            method.begin_window(self.model, [self.train_set[i] for micro in window for i in micro], self.pad_id,
                                self.device, self.amp)
        loss_sum = 0.0
        for piece in pieces:
            batch = method.collate([self.train_set[i] for i in piece], self.pad_id, self.device)
            with autocast(self.device, self.amp):
                loss, _ = method.loss(self.model, batch)
            (loss / window_weight).backward()
            loss_sum += float(loss.detach())
            state["trained_tokens"] += sum(self.tokens[i] for i in piece)
        with autocast(self.device, self.amp):  # a term computed once per optimizer step (SFT's distillation)
            auxiliary = method.auxiliary_loss(self.model, state["step"])
        if auxiliary is not None:
            (auxiliary / self.world).backward()
        _all_reduce_gradients(self.params, self.world)
        loss_sum = _summed_over_ranks(loss_sum, self.world)
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.heap is not None:
            self.heap.after_step()
        state["step"], state["train_loss"] = state["step"] + 1, loss_sum / window_weight
        state["seconds"] = time.perf_counter() - self.start_time

    def _validate(self) -> tuple[float, dict]:
        """Validation loss (and the method's statistics); keeps the best weights, counts toward early stopping."""
        state, cfg = self.state, self.cfg
        eval_start = time.perf_counter()
        val_stats = self.method.validate(self.model, self.val_set, cfg.batch_size, self.pad_id, self.device, self.amp)
        val = val_stats["val_loss"]
        state["validation_seconds"] += time.perf_counter() - eval_start
        state["val_history"].append({"step": state["step"], **val_stats})
        if state["best_val"] is None or val < state["best_val"]:
            state["best_val"], state["bad_evals"] = val, 0
            state["best_val_stats"] = val_stats
            if self.rank == 0:
                atomic.torch_save(self.best_path, _trainable_state(self.model))
        else:
            state["bad_evals"] += 1
            if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                self.log(f"early stopping: validation loss has not improved for {state['bad_evals']} evaluations")
                self.early_stopped = True
        return val, val_stats

    def _report(self, step_stats: dict, val: float | None, val_stats: dict) -> None:
        """The step's metrics to `on_metrics` (by default a progress line every few steps: progress.py)."""
        state = self.state
        self.on_metrics({**step_stats, **val_stats, "step": state["step"], "total_steps": self.total_steps,
                         "train_loss": state["train_loss"], "lr": self.scheduler.get_last_lr()[0], "val_loss": val,
                         "trained_tokens": state["trained_tokens"], "seconds": time.perf_counter() - self.start_time,
                         "validation_seconds": state["validation_seconds"]})

    # -- finish --------------------------------------------------------------------------------------
    def finish(self) -> TrainingResult:
        """Restore the best weights, save `output_dir / method.output_name` (rank 0), write metrics.json."""
        state = self.state
        if self.world > 1:  # every rank waits for rank 0's files before reading them
            import torch.distributed as dist

            dist.barrier()
            state["trained_tokens"] = int(_summed_over_ranks(state["trained_tokens"], self.world, torch.int64))
        if self.best_path.exists():  # keep the weights with the best validation loss
            _load_trainable(self.model, torch.load(self.best_path, weights_only=True))
        self.method.finish(self.model)
        if self.heap is not None:  # the last steps' activations, before saving and evaluation
            release_freed_memory_to_os()
        seconds = time.perf_counter() - self.start_time
        out = self.output_dir / self.method.output_name
        if self.rank == 0:
            with atomic.atomic_dir(out) as tmp:  # readers see the previous complete adapter or the new one
                self.method.save(self.model, self.tokenizer, tmp, self.model_dir)
        metrics = self._metrics(seconds)
        if self.rank == 0:
            atomic.write_json(self.output_dir / "metrics.json", metrics)
        return TrainingResult(adapter_dir=out, method=self.method.name, metrics=metrics)

    def _metrics(self, seconds: float) -> dict:
        state, step = self.state, self.state["step"]
        return {
            "method": self.method.name, "device": self.device, "precision": self.precision,
            "precision_choice": self.choice.to_metadata(), "steps": step, "optimizer_steps_planned": self.total_steps,
            "epochs_completed": round(step / self.steps_per_epoch, 3), "train_loss": state["train_loss"],
            "val_loss": state["best_val"], "val_loss_history": state["val_history"],
            "trained_tokens": state["trained_tokens"],
            # Throughput of the training steps; validation passes are timed separately.
            "tokens_per_second": round(state["trained_tokens"] / max(seconds - state["validation_seconds"], 1e-9), 1),
            "seconds": round(seconds, 2), "validation_seconds": round(state["validation_seconds"], 2),
            "early_stopped": self.early_stopped, "resumed_from_step": self.resumed_from,
            "trainable_parameters": sum(p.numel() for p in self.params), "processes": self.world,
            **{k: v for k, v in state.get("best_val_stats", {}).items() if k != "val_loss"},
            **self.method.extra_metrics(),
        }


def _summed_over_ranks(value, world: int, dtype=torch.float64):
    """`value` summed over the ranks (itself with one process)."""
    if world == 1:
        return value
    import torch.distributed as dist

    summed = torch.tensor([value], dtype=dtype)
    dist.all_reduce(summed)
    return float(summed) if dtype.is_floating_point else int(summed)


def _load_trainable(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors into `model`'s parameters (on their devices)."""
    with torch.no_grad():
        named = dict(model.named_parameters())
        for k, v in tensors.items():
            named[k].copy_(v.to(named[k].device))
