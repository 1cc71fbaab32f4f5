"""Stage-4 fine-tuning on the shards (`m3-curate finetune`).

- `data`: `ShardStream` (streaming over Parquet row groups, seeded, split across processes)
  and `row_to_chat`;
- `chat`: `ChatCollator` (the processor's chat template, labels on assistant tokens only, rows
  that cannot be used set aside by reason) and `check_template`;
- `processors`: `load_processor` (a family's processor without its video part where
  torchvision is missing);
- `lora`: `model_parts` (language model, vision encoder, projector found in the model) and
  `lora_config`;
- `memory`: the model state's size on the device; `machine`: torch threads on CPU;
- `tiny`: `build_tiny`, an offline tiny LLaVA for tests and the demo (`--model tiny`);
- `train`: `TrainConfig` and `train`, the single-process loop with checkpoints and resume;
- `ray_train`: `train_on_ray`, the same loop on Ray Train workers (`--workers N --use-gpu`).

Heavy imports (torch, transformers, peft, Ray) happen when a command runs, not on import.
"""

from __future__ import annotations

import argparse
import json


def finetune_command(args: argparse.Namespace) -> None:
    """`m3-curate finetune --data DIR --model PATH|tiny --out DIR [options]`."""
    from curation.finetune.train import TrainConfig, prepare, train
    from curation.folder_lock import FolderLock

    with FolderLock(args.out, "finetune", "--out"):
        address = getattr(args, "address", None)
        if args.workers:
            from curation.ray_address import cluster_address

            address = cluster_address(address)  # a cluster that does not answer is said before any model is built
        config = prepare(TrainConfig.from_args(args))
        if args.workers:
            from curation.finetune.ray_train import train_on_ray

            summary = train_on_ray(config, workers=args.workers, use_gpu=args.use_gpu, address=address)
        else:
            if args.use_gpu:
                import torch

                if not torch.cuda.is_available():
                    from curation.errors import CurationError

                    raise CurationError("--use-gpu: no CUDA device is visible to this process")
            summary = train(config)
    brief = {k: v for k, v in summary.items() if k != "losses"}
    print(json.dumps({"out": config.out, **brief}))
