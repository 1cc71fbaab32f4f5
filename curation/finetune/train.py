"""The stage-4 training loop: one process here, or one per Ray Train worker (`ray_train.py`).

A plain PyTorch loop rather than `transformers.Trainer`, so that streaming, the exact resume
position and the Ray wrapping stay in one place that reads top to bottom:

- data: `ShardStream` over the train split (row groups, seeded per epoch, split per process)
  and `ChatCollator` (processor chat template, labels on assistant tokens only);
- the loss is summed over every assistant token of the optimizer step (all micro-batches and
  processes) and divided by their count, so gradient accumulation and uneven turn lengths do
  not reweight tokens;
- AdamW, cosine schedule with linear warmup (VILA-M3: lr 2e-5, warmup ratio 0.03), gradient
  clipping at 1.0; bf16 autocast (fp32 master weights) and gradient checkpointing on GPU;
  LoRA through `peft` as an option (language-model projections, projector fully trained);
- checkpoints `OUT/checkpoint-<step>/` (weights or adapter, processor, optimizer, scheduler,
  `trainer_state.json`, written last under a temporary name and renamed, so a half-written
  checkpoint is never picked up); `resume=True` continues from the newest one at its step and
  data position; the final model (LoRA merged) goes to `OUT/` with `train_summary.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from curation.errors import CurationError
from curation.finetune.data import ChatCollator, ShardStream, count_rows, shard_files

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
FULL_LR = 2e-5  # VILA-M3's learning rate for full tuning (cosine, warmup ratio 0.03)
LORA_LR = 2e-4  # the usual order for LoRA adapters
TINY_LR = 1e-3  # the tiny model learns from scratch
# LoRA on the language model's projections (LLaVA, Qwen2-VL and most HF VLMs name them so),
# not on the vision tower; the multimodal projector is trained fully.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


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
    lora_targets: str = LORA_TARGETS
    resume: bool = False
    seed: int = 0
    save_steps: int = 500
    save_total_limit: int = 2
    log_steps: int = 10
    max_length: int | None = None
    shuffle_buffer: int = 256
    num_workers: int = 0
    bf16: bool | None = None  # None: on a GPU that supports it
    gradient_checkpointing: bool | None = None  # None: on GPU
    cpu_threads: int | None = None  # torch threads on CPU (1 is fastest for the tiny model on a busy machine)
    tiny: dict[str, Any] = field(default_factory=dict)  # build_tiny keyword arguments for --model tiny

    @classmethod
    def from_args(cls, args: Any) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def prepare(config: TrainConfig) -> TrainConfig:
    """Check the inputs before any worker starts, and build the tiny model for `--model tiny`
    (once, in `OUT/tiny-base`, reused on resume)."""
    if config.batch_size < 1 or config.grad_accum < 1:
        raise CurationError("--batch-size and --grad-accum must be at least 1")
    if config.epochs <= 0 and config.max_steps <= 0:
        raise CurationError("--epochs must be positive (or give --max-steps)")
    shard_files(config.data, "train")
    if config.lr is None:
        config.lr = TINY_LR if config.model == "tiny" else LORA_LR if config.lora else FULL_LR
    if config.model == "tiny":
        from curation.finetune.tiny import build_tiny

        base = Path(config.out) / "tiny-base"
        if not (base / "config.json").exists():
            build_tiny(config.data, base, seed=config.seed, **config.tiny)
        config.model = str(base)
    elif not (Path(config.model) / "config.json").exists():
        raise CurationError(f"--model {config.model}: not a model folder (no config.json); give a local model folder or 'tiny'")
    return config


def checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    found = [p for p in Path(out).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / STATE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.bf16 is not None:
        return config.bf16 and device.type == "cuda"
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def load_model(config: TrainConfig, device: torch.device, checkpoint: Path | None):
    """The model to train (and its processor): from the checkpoint when resuming."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    bf16 = _use_bf16(config, device)
    if config.lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        # frozen base weights may stay in bf16; adapters and the projector train in fp32
        base = AutoModelForImageTextToText.from_pretrained(config.model, dtype=torch.bfloat16 if bf16 else torch.float32)
        if checkpoint is not None:
            model = PeftModel.from_pretrained(base, checkpoint, is_trainable=True)
        else:
            save = [n for n in ("multi_modal_projector",) if any(n in name for name, _ in base.named_modules())]
            lora = LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank, lora_dropout=config.lora_dropout,
                target_modules=config.lora_targets, modules_to_save=save or None, task_type="CAUSAL_LM",
            )
            model = get_peft_model(base, lora)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        model = AutoModelForImageTextToText.from_pretrained(checkpoint or config.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(checkpoint or config.model)
    checkpointing = config.gradient_checkpointing if config.gradient_checkpointing is not None else device.type == "cuda"
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device), processor


def _save(model: Any, processor: Any, path: Path) -> None:
    model = getattr(model, "module", model)  # DDP
    model.save_pretrained(path)
    processor.save_pretrained(path)


def save_checkpoint(out: Path, step: int, model: Any, processor: Any, optimizer: Any, scheduler: Any, state: dict, keep: int) -> Path:
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _save(model, processor, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / STATE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s", final)
    return final


def total_steps(config: TrainConfig, rows: int, world_size: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum * world_size
    return max(1, math.ceil(config.epochs * rows / per_step))


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
    if config.cpu_threads and device.type == "cpu":
        torch.set_num_threads(config.cpu_threads)
    out = Path(config.out)
    torch.manual_seed(config.seed + rank)
    files = shard_files(config.data, "train")
    rows = count_rows(files)
    steps = total_steps(config, rows, world_size)

    resume_from = checkpoints(out)[-1] if config.resume and checkpoints(out) else None
    if config.resume and resume_from is None:
        log.warning("--resume: no checkpoint in %s yet, starting from step 0", out)
    state: dict[str, Any] = json.loads((resume_from / STATE).read_text()) if resume_from else {"step": 0, "losses": []}
    if resume_from and state.get("world_size", world_size) != world_size:
        log.warning("resuming with %d processes after %d: the data position is approximate", world_size, state["world_size"])

    model, processor = load_model(config, device, resume_from)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr or FULL_LR, weight_decay=config.weight_decay)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * steps), steps)
    if resume_from:
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(torch.load(resume_from / "scheduler.pt", weights_only=True))
        log.info("resumed from %s at step %d", resume_from, state["step"])
    if wrap is not None:
        model = wrap(model)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    collator = ChatCollator(processor, max_length=config.max_length)
    start = state["step"]
    stream = ShardStream(
        files, collate=collator, batch_size=config.batch_size, seed=config.seed, shuffle_buffer=config.shuffle_buffer,
        rank=rank, world_size=world_size, skip_batches=start * config.grad_accum,
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers)
    batches = iter(loader)
    bf16 = _use_bf16(config, device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    n_params = sum(p.numel() for p in params)
    if rank == 0:
        log.info(
            "training %s on %d rows (%s): %d steps of %d×%d×%d rows, %d trainable parameters, %s%s",
            config.model, rows, out, steps, config.batch_size, config.grad_accum, world_size, n_params, device,
            ", bf16" if bf16 else "",
        )

    model.train()
    t0, seen = time.monotonic(), 0
    losses: list[list[float]] = state["losses"]
    last: dict[str, Any] | None = None  # the last batch this process trained on
    for step in range(start, steps):
        micro = [b for b in (next(batches) for _ in range(config.grad_accum)) if b]
        tokens = torch.tensor(float(sum(int((b["labels"][..., 1:] != -100).sum()) for b in micro)), device=device)
        if world_size > 1:
            torch.distributed.all_reduce(tokens)
        if tokens.item() == 0:  # every row dropped by --max-length, or no assistant tokens: nothing to learn
            log.warning("step %d: no assistant tokens in the batch; skipped", step + 1)
            micro = []
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            seen += batch["input_ids"].shape[0]
            # DDP synchronises gradients on the last micro-batch only
            with contextlib.nullcontext() if not ddp or i == len(micro) - 1 else model.no_sync():
                with autocast():
                    # summed over this step's assistant tokens, divided by their count on all
                    # processes; DDP averages gradients over processes, hence × world_size
                    loss = model(**batch, use_cache=False, num_items_in_batch=tokens).loss * world_size
                loss.backward()
            step_loss += loss.detach() / world_size
        if ddp and not micro and tokens.item() > 0 and last is not None:
            # this process's rows were all dropped (--max-length) but others have tokens: take
            # part in the gradient all-reduce with zeros, or the others would wait forever
            with autocast():
                (model(**last, use_cache=False).loss * 0.0).backward()
        last = batch if micro else last
        if world_size > 1:
            torch.distributed.all_reduce(step_loss)
        if params:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        value = float(step_loss)
        losses.append([done, round(value, 5)])
        if done % config.log_steps == 0 or done == steps:
            rate = seen / max(time.monotonic() - t0, 1e-9)
            metrics = {"step": done, "loss": value, "lr": scheduler.get_last_lr()[0], "rows_per_s": rate * world_size}
            if rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e %.1f rows/s", done, steps, value, metrics["lr"], metrics["rows_per_s"])
            if report is not None:
                report(metrics)
        if rank == 0 and (done % config.save_steps == 0 or done == steps):
            state = {"step": done, "total_steps": steps, "world_size": world_size, "base_model": config.model,
                     "lora": config.lora, "config": asdict(config), "losses": losses}
            save_checkpoint(out, done, model, processor, optimizer, scheduler, state, config.save_total_limit)
        if world_size > 1 and done % config.save_steps == 0:
            torch.distributed.barrier()

    summary = {
        "steps": steps, "resumed_from": start, "rows": rows, "trainable_parameters": n_params,
        "dropped_rows": collator.dropped,  # counted here only with --num-workers 0
        "seconds": round(time.monotonic() - t0, 2), "final_loss": losses[-1][1] if losses else None, "losses": losses,
    }
    if rank == 0:
        final = getattr(model, "module", model)
        if config.lora:
            (out / "adapter").mkdir(parents=True, exist_ok=True)
            final.save_pretrained(out / "adapter")
            final = final.merge_and_unload()
        if getattr(final, "is_activation_checkpointing", False):
            final.activation_checkpointing_disable()
        _save(final, processor, out)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        log.info("model written to %s (%d steps, final loss %s)", out, steps, summary["final_loss"])
    return summary
