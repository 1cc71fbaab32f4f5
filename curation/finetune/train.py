"""The stage-4 training loop: one process here, or one per Ray Train worker (`ray_train.py`).

A plain PyTorch loop rather than `transformers.Trainer`, so that streaming, the exact resume
position and the Ray wrapping stay in one place that reads top to bottom:

- data: `ShardStream` over the train split (row groups, seeded per epoch, split per process)
  and `ChatCollator` (processor chat template, labels on assistant tokens only, rows longer
  than the model's context set aside and counted);
- the loss is summed over every assistant token of the optimizer step (all micro-batches and
  processes) and divided by their count, so gradient accumulation and uneven turn lengths do
  not reweight tokens (`Stepper`);
- AdamW, cosine schedule with linear warmup (VILA-M3: lr 2e-5, warmup ratio 0.03), gradient
  clipping at 1.0; bf16 autocast (fp32 master weights) and gradient checkpointing on GPU;
  LoRA through `peft` as an option (`lora.py`: the language model's linear layers, wherever the
  family keeps them, and the projector trained fully);
- on CPU, torch uses the idle CPUs this process may use (`cpu_threads`) unless told otherwise;
- checkpoints `OUT/checkpoint-<step>/` (weights or adapter, processor, optimizer, scheduler,
  `trainer_state.json`, written under a temporary name and renamed, so a half-written
  checkpoint is never picked up) every `save_steps` steps, at the end of every epoch and at the
  end; `resume=True` continues from the newest one at its step and data position; the final
  model (LoRA merged) goes to `OUT/` with `train_summary.json`;
- log lines give the step, epoch, loss, rows/s and the time left (`StepLog`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from curation.atomic import write_text
from curation.errors import CurationError
from curation.finetune.chat import ChatCollator, check_template
from curation.finetune.data import TRAIN_COLUMNS, ShardStream, count_rows
from curation.finetune.machine import cpu_threads
from curation.finetune.memory import gib, state_bytes
from curation.finetune.model_folder import loading, saving
from curation.finetune.processors import load_processor, save_processor
from curation.store.layout import iter_rows, shard_files

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
FULL_LR = 2e-5  # VILA-M3's learning rate for full tuning (cosine, warmup ratio 0.03)
LORA_LR = 2e-4  # 10× full tuning: only the adapters and the projector learn (the usual order for LoRA)
TINY_LR = 1e-3  # the tiny model learns from scratch


@dataclass(slots=True)
class TrainConfig:
    """What `m3-curate finetune` runs. Defaults for full tuning are VILA-M3's."""

    data: str
    model: str  # a local model folder; "tiny" is resolved by `prepare` before training
    out: str
    epochs: float = 1.0
    lr: float | None = None  # None: 2e-5 (VILA-M3, full tuning), 2e-4 with LoRA, 1e-3 for the tiny model
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = -1  # > 0 overrides epochs
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int | None = None  # None: 2 × rank
    lora_dropout: float = 0.05
    lora_targets: str | None = None  # None: every linear layer of the language model (found in the model)
    resume: bool = False
    seed: int = 0
    save_steps: int = 500  # and at the end of every epoch
    save_total_limit: int = 2
    log_steps: int = 10
    max_length: int | None = None  # None: the model's context
    shuffle_buffer: int = 256
    num_workers: int = 0
    bf16: bool | None = None  # None: on a GPU that supports it
    gradient_checkpointing: bool | None = None  # None: on GPU
    cpu_threads: int | None = None  # None: the idle CPUs this process may use (see `cpu_threads`)
    tiny: dict[str, Any] = field(default_factory=dict)  # build_tiny keyword arguments for --model tiny

    @classmethod
    def from_args(cls, args: Any) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


# --- before training -----------------------------------------------------------------------


def prepare(config: TrainConfig) -> TrainConfig:
    """Check the inputs before any worker starts — shards, model folder, the chat template on
    the first rows, the model's LoRA parts — and build the tiny model for `--model tiny` (once,
    in `OUT/tiny-base`, reused on resume)."""
    if config.batch_size < 1 or config.grad_accum < 1:
        raise CurationError("--batch-size and --grad-accum must be at least 1")
    if config.epochs <= 0 and config.max_steps <= 0:
        raise CurationError("--epochs must be positive (or give --max-steps)")
    files = shard_files(config.data, "train", columns=TRAIN_COLUMNS).files
    if config.lr is None:
        config.lr = TINY_LR if config.model == "tiny" else LORA_LR if config.lora else FULL_LR
    if config.model == "tiny":
        from curation.finetune.tiny import build_tiny

        base = Path(config.out) / "tiny-base"
        if not (base / "config.json").exists():
            build_tiny(config.data, base, seed=config.seed, warn=False, **config.tiny)
        config.model = str(base)
    elif not (Path(config.model) / "config.json").exists():
        raise CurationError(f"--model {config.model}: not a model folder (no config.json); give a local model folder or 'tiny'")
    check_template(load_processor(config.model), list(iter_rows(files, columns=TRAIN_COLUMNS, limit=4)), name=config.model)
    if config.lora:
        _check_lora_parts(config.model)
    check_resume(config, count_rows(files))
    return config


RUN_SETTINGS = {  # TrainConfig field → how a user names it (a flag, or the field for those a program sets)
    "lora": "--lora", "lora_rank": "--lora-rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
    "lora_targets": "lora_targets", "batch_size": "--batch-size", "grad_accum": "--grad-accum", "lr": "--lr",
    "warmup_ratio": "--warmup-ratio", "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm",
    "max_length": "--max-length", "seed": "--seed", "shuffle_buffer": "--shuffle-buffer",
}
"""What a resumed run shares with the run that wrote its checkpoint: the model's form (LoRA or
not), the optimizer's settings, and the batches (their size and order: the checkpoint says how
many were used, not which). `--epochs`/`--max-steps` may change (a run made longer), and so may
where and how often it saves and logs, and the machine it runs on (`--workers`, with a warning)."""


def check_resume(config: TrainConfig, rows: int) -> None:
    """An `--out` with checkpoints holds a run: only `--resume` goes on in it, and with the
    settings, base model and train rows of the run that wrote the newest checkpoint. Otherwise
    a run would quietly train another from the middle of this one (other batches skipped as
    seen, another schedule) or fail to load it; and a fresh run there would leave the old
    checkpoints beside its own, the newest of them (the old run's) kept and resumed from."""
    found = checkpoints(config.out)
    if not found:
        return
    if not config.resume:
        raise CurationError(f"--out {config.out} holds the checkpoints of an earlier run (the newest {found[-1].name}): add --resume "
                            "to go on from it, or choose another --out to start afresh")
    state = json.loads((found[-1] / STATE).read_text())
    saved = state.get("config", {})
    changed = [f"{name} {_shown(saved[k])} (now {_shown(getattr(config, k))})"
               for k, name in RUN_SETTINGS.items() if k in saved and saved[k] != getattr(config, k)]
    base = state.get("base_model")
    if base is not None and Path(base).resolve() != Path(config.model).resolve():
        changed.insert(0, f"--model {base} (now {config.model})")
    if state.get("train_rows", rows) != rows:
        changed.append(f"{state['train_rows']} train rows in --data (now {rows})")
    if changed:
        raise CurationError(f"--resume: {found[-1]} was written by a run with {', '.join(changed)}: give the same to go on from it, "
                            "or choose another --out to start afresh")


def _shown(value: Any) -> str:
    return {True: "on", False: "off", None: "unset"}.get(value, str(value)) if isinstance(value, (bool, type(None))) else str(value)


def _check_lora_parts(model: str) -> None:
    """Find the model's LoRA parts on an empty (meta-device) copy: no weights are read."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from curation.finetune.lora import model_parts

    with torch.device("meta"):
        empty = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model))
    model_parts(empty, name=model)


def checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    found = [p for p in Path(out).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / STATE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def steps_per_epoch(config: TrainConfig, rows: int, world_size: int) -> int:
    """Optimizer steps that see every row once (a checkpoint is written after each epoch)."""
    return total_steps(config, rows, world_size, epochs=1.0)


def total_steps(config: TrainConfig, rows: int, world_size: int, *, epochs: float | None = None) -> int:
    if config.max_steps > 0 and epochs is None:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum * world_size
    return max(1, math.ceil((epochs or config.epochs) * rows / per_step))


def _use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.bf16 is not None:
        return config.bf16 and device.type == "cuda"
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


# --- model, optimizer, checkpoints ---------------------------------------------------------


def _with_lora(config: TrainConfig, bf16: bool, checkpoint: Path | None) -> Any:
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    from curation.finetune.lora import lora_config

    # frozen base weights may stay in bf16; adapters and the projector train in fp32
    with loading(config.model, _reload_advice(config, None)):
        base = AutoModelForImageTextToText.from_pretrained(config.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    if checkpoint is not None:
        with loading(checkpoint, _reload_advice(config, checkpoint)):
            model = PeftModel.from_pretrained(base, checkpoint, is_trainable=True)
    else:
        lora = lora_config(base, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           targets=config.lora_targets, name=config.model)
        model = get_peft_model(base, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def load_model(config: TrainConfig, device: torch.device, checkpoint: Path | None) -> tuple[Any, Any]:
    """The model to train (and its processor): from the checkpoint when resuming."""
    from transformers import AutoModelForImageTextToText

    folder, advice = checkpoint or config.model, _reload_advice(config, checkpoint)
    if config.lora:
        model = _with_lora(config, _use_bf16(config, device), checkpoint)  # the LoRA set-up's own errors are not the folder's
    else:
        with loading(folder, advice):
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    with loading(folder, advice):
        processor = load_processor(folder)
    if config.gradient_checkpointing if config.gradient_checkpointing is not None else device.type == "cuda":
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device), processor


def _reload_advice(config: TrainConfig, checkpoint: Path | None) -> str:
    if checkpoint is None:
        return f"--model {config.model}: copy the model folder again"
    return f"remove {checkpoint.name}, and --resume goes on from the checkpoint before it, or from --model when none is left"


def context_length(model: Any) -> int | None:
    """The longest sequence the model's text config allows, if it says."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], steps: int) -> tuple[Any, Any]:
    """AdamW and a cosine schedule with linear warmup over `steps`."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=config.lr or FULL_LR, weight_decay=config.weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * steps), steps)


def restore(config: TrainConfig, world_size: int) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint to resume from (with `resume`) and its state; else a fresh state."""
    found = checkpoints(config.out) if config.resume else []
    if config.resume and not found:
        log.warning("--resume: no checkpoint in %s yet, starting from step 0", config.out)
    if not found:
        return None, {"step": 0, "losses": []}
    state = json.loads((found[-1] / STATE).read_text())
    if state.get("world_size", world_size) != world_size:
        log.warning("resuming with %d processes after %d: the data position is approximate", world_size, state["world_size"])
    return found[-1], state


def _save(model: Any, processor: Any, path: Path, base: str) -> None:
    getattr(model, "module", model).save_pretrained(path)  # DDP wraps it in .module
    save_processor(processor, path, base=base)


def save_checkpoint(out: Path, step: int, model: Any, processor: Any, optimizer: Any, scheduler: Any, state: dict, keep: int) -> Path:
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with saving(final):
            _save(model, processor, tmp, state["base_model"])
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / STATE).write_text(json.dumps(state, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)
    return final


def write_final(model: Any, processor: Any, config: TrainConfig, summary: dict[str, Any]) -> None:
    """The trained model (LoRA merged, its adapter beside it in `adapter/`) and the summary."""
    out, final = Path(config.out), getattr(model, "module", model)
    with saving(out):
        if config.lora:
            (out / "adapter").mkdir(parents=True, exist_ok=True)
            final.save_pretrained(out / "adapter")
            final = final.merge_and_unload()
        if getattr(final, "is_activation_checkpointing", False):
            final.activation_checkpointing_disable()
        _save(final, processor, out, config.model)
        write_text(out / "train_summary.json", json.dumps(summary, indent=1))
    log.info("model written to %s (%d steps, final loss %s)", out, summary["steps"], summary["final_loss"])


# --- the step and the loop -----------------------------------------------------------------


class Stepper:
    """One optimizer step over a list of micro-batches: the loss is summed over the step's
    assistant tokens on every process and divided by their count; DDP synchronises gradients
    on the last micro-batch only."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, *, config: TrainConfig, device: torch.device, world_size: int):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device, self.world_size, self.max_grad_norm = device, world_size, config.max_grad_norm
        self.ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        bf16 = _use_bf16(config, device)
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.rows = 0  # rows this process trained on
        self.last: dict[str, Any] | None = None  # the last batch this process trained on

    def _tokens(self, micro: list[dict[str, Any]]) -> torch.Tensor:
        tokens = torch.tensor(float(sum(int((b["labels"][..., 1:] != -100).sum()) for b in micro)), device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(tokens)
        return tokens

    def _backward(self, micro: list[dict[str, Any]], tokens: torch.Tensor) -> torch.Tensor:
        step_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}
            self.rows += batch["input_ids"].shape[0]
            with contextlib.nullcontext() if not self.ddp or i == len(micro) - 1 else self.model.no_sync():
                with self.autocast():
                    # summed over this step's assistant tokens, divided by their count on all
                    # processes; DDP averages gradients over processes, hence × world_size
                    loss = self.model(**batch, use_cache=False, num_items_in_batch=tokens).loss * self.world_size
                loss.backward()
            step_loss += loss.detach() / self.world_size
            self.last = batch
        return step_loss

    def __call__(self, micro: list[dict[str, Any]], step: int) -> float:
        micro = [b for b in micro if b]
        tokens = self._tokens(micro)
        if tokens.item() == 0:  # every row set aside, or no assistant tokens: nothing to learn
            log.warning("step %d: no assistant tokens in the batch; skipped", step)
            micro = []
        step_loss = self._backward(micro, tokens)
        if self.ddp and not micro and tokens.item() > 0 and self.last is not None:
            # this process's rows were all set aside but others have tokens: take part in the
            # gradient all-reduce with zeros, or the others would wait forever
            with self.autocast():
                (self.model(**self.last, use_cache=False).loss * 0.0).backward()
        if self.world_size > 1:
            torch.distributed.all_reduce(step_loss)
        if self.params:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(step_loss)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass(slots=True)
class StepLog:
    """When to log and checkpoint, and the log line: step, epoch, loss, speed, time left."""

    start: int
    steps: int
    per_epoch: int
    log_steps: int
    save_steps: int
    world_size: int
    t0: float = field(default_factory=time.monotonic)

    def log_due(self, done: int) -> bool:
        return done % self.log_steps == 0 or done == self.steps

    def save_due(self, done: int) -> bool:
        return done % self.save_steps == 0 or done % self.per_epoch == 0 or done == self.steps

    def metrics(self, done: int, loss: float, lr: float, rows: int) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        eta = elapsed / max(done - self.start, 1) * (self.steps - done)
        return {"step": done, "loss": loss, "lr": lr, "rows_per_s": rows / elapsed * self.world_size,
                "epoch": done / self.per_epoch, "elapsed_s": round(elapsed, 1), "eta_s": round(eta, 1)}

    def line(self, m: dict[str, Any]) -> str:
        return (f"step {m['step']}/{self.steps} ({100 * m['step'] / self.steps:.0f}%) epoch {m['epoch']:.2f} "
                f"loss {m['loss']:.4f} lr {m['lr']:.2e} {m['rows_per_s']:.1f} rows/s "
                f"elapsed {_clock(m['elapsed_s'])} ETA {_clock(m['eta_s'])}")


@dataclass(slots=True)
class Run:
    """What the loop works with, set up by `_setup`."""

    rows: int
    set_aside: dict[str, str]  # shards that could not be read: path → why (`shard_files`)
    state: dict[str, Any]
    model: Any
    processor: Any
    collator: ChatCollator
    stepper: Stepper
    batches: Iterator[dict[str, Any]]
    progress: StepLog


def _setup(config: TrainConfig, rank: int, world_size: int, device: torch.device, wrap: Callable | None) -> Run:
    """Model, processor, optimizer and schedule (restored when resuming), collator, batches
    from the resume position on, progress."""
    shards = shard_files(config.data, "train", columns=TRAIN_COLUMNS, warn=False)  # `prepare` warned
    files = shards.files
    rows = count_rows(files)
    steps = total_steps(config, rows, world_size)
    resume_from, state = restore(config, world_size)
    model, processor = load_model(config, device, resume_from)
    optimizer, scheduler = make_optimizer(config, [p for p in model.parameters() if p.requires_grad], steps)
    if resume_from:
        with loading(resume_from, _reload_advice(config, resume_from)):
            optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=device, weights_only=True))
            scheduler.load_state_dict(torch.load(resume_from / "scheduler.pt", weights_only=True))
        log.info("resumed from %s at step %d", resume_from, state["step"])
    collator = ChatCollator(processor, max_length=config.max_length or context_length(model), name=config.model)
    stream = ShardStream(
        files, stamps=shards.stamps, collate=collator, batch_size=config.batch_size, seed=config.seed, shuffle_buffer=config.shuffle_buffer,
        rank=rank, world_size=world_size, skip_batches=state["step"] * config.grad_accum,
    )
    model = wrap(model) if wrap is not None else model
    return Run(
        rows, shards.set_aside, state, model, processor, collator, Stepper(model, optimizer, scheduler, config=config, device=device, world_size=world_size),
        iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers)),
        StepLog(state["step"], steps, steps_per_epoch(config, rows, world_size), config.log_steps, config.save_steps, world_size),
    )


def _checkpoint(run: Run, config: TrainConfig, done: int, rank: int, world_size: int) -> None:
    if rank == 0:
        state = {"step": done, "total_steps": run.progress.steps, "world_size": world_size, "base_model": config.model, "train_rows": run.rows,
                 "lora": config.lora, "config": asdict(config), "losses": run.state["losses"]}
        stepper = run.stepper
        save_checkpoint(Path(config.out), done, run.model, run.processor, stepper.optimizer, stepper.scheduler, state, config.save_total_limit)
    if world_size > 1:
        torch.distributed.barrier()


def _summary(run: Run) -> dict[str, Any]:
    losses = run.state["losses"]
    return {
        "steps": run.progress.steps, "resumed_from": run.progress.start, "rows": run.rows,
        "trainable_parameters": sum(p.numel() for p in run.stepper.params),
        # rows set aside, by reason (counted here only with --num-workers 0)
        "dropped_rows": run.collator.dropped, "skipped_rows": dict(run.collator.skipped), "set_aside_shards": run.set_aside,
        "seconds": round(time.monotonic() - run.progress.t0, 2), "final_loss": losses[-1][1] if losses else None, "losses": losses,
    }


def train(
    config: TrainConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train as `config` says and return the run's summary. `wrap` (e.g. Ray's
    `prepare_model`) wraps the model for data parallelism; `report` receives metrics at each
    log step on every process. Only rank 0 writes files."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(config.cpu_threads))
    torch.manual_seed(config.seed + rank)
    run = _setup(config, rank, world_size, device, wrap)
    progress, stepper = run.progress, run.stepper
    if rank == 0:
        state = state_bytes(run.model)
        log.info("training %s on %d rows (%s): %d steps of %d×%d×%d rows (%d an epoch), %d trainable parameters, "
                 "model state %.1f GiB (weights, gradients, AdamW; activations extra), %s%s",
                 config.model, run.rows, config.out, progress.steps, config.batch_size, config.grad_accum, world_size,
                 progress.per_epoch, state["trainable"], gib(state["bytes"]), device,
                 f", torch threads: {torch.get_num_threads()}" if device.type == "cpu" else "")
    run.model.train()
    for done in range(progress.start + 1, progress.steps + 1):
        loss = stepper([next(run.batches) for _ in range(config.grad_accum)], done)
        run.state["losses"].append([done, round(loss, 5)])
        if progress.log_due(done):
            metrics = progress.metrics(done, loss, stepper.scheduler.get_last_lr()[0], stepper.rows)
            if rank == 0:
                log.info(progress.line(metrics))
            if report is not None:
                report(metrics)
        if progress.save_due(done):
            _checkpoint(run, config, done, rank, world_size)
    summary = _summary(run)
    if rank == 0:
        write_final(run.model, run.processor, config, summary)
    return summary
