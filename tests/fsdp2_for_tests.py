"""What the FSDP2 tests name by dotted path in a config (`fsdp2_for_tests.SaveGlobalLoss`): callbacks, and a
GRPO module that replays recorded rollouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_veripo.grpo import GRPOModule
from lightning_veripo.rollout import RolloutEngine, Sampled, Sampling


class ExportAdapterAndOutputs(L.Callback):
    """At the end of training: the stage's adapter exported to `out/adapter` (every rank calls it; under FSDP2
    it is gathered to full tensors and written once), and each rank's last training batch with the policy's
    log-probs of that batch's rollouts under the (sharded) model, to `out/outputs_rank{R}.pt`, so a test can
    score the same rollouts with the exported adapter in one process."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.last: tuple[dict, torch.Tensor, torch.Tensor] | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:  # noqa: ANN001
        rollouts = outputs["rollouts"]
        width = max(len(r.completion_ids) for r in rollouts)
        ids = torch.full((len(rollouts), width), pl_module.backbone.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rollouts):
            ids[i, : len(r.completion_ids)] = torch.tensor(r.completion_ids)
            mask[i, : len(r.completion_ids)] = 1
        self.last = (batch, ids, mask)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.last is not None
        batch, ids, mask = self.last
        pl_module.backbone.save_pretrained(self.out / "adapter")
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logps = pl_module.backbone.sequence_logprobs(
                batch, ids, mask, num_samples=pl_module.num_generations
            )
        pl_module.train(was_training)
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        torch.save({"batch": tensors, "ids": ids, "mask": mask, "logps": logps},
                   self.out / f"outputs_rank{trainer.global_rank}.pt")  # fmt: skip


class SaveGlobalLoss(L.Callback):
    """Saves the first training step's loss averaged over the ranks (what one process would compute for the
    global batch when every rank holds the same number of samples) to `path`, from rank zero."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.saved = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:  # noqa: ANN001
        if self.saved:
            return
        self.saved = True
        loss = outputs["loss"].detach().float()
        mean = trainer.strategy.reduce(loss, reduce_op="mean")
        if trainer.is_global_zero:
            torch.save(mean.cpu(), self.path)


class ReplayedRollouts(RolloutEngine):
    """Hands back the completion token ids recorded for each prompt (`rollouts.jsonl` of a real fit, step
    `step`) instead of sampling, so a sharded fit and one process see the same rollouts; the completions are
    masked and decoded by the code that handles generated ids, and everything after (rewards, advantages,
    log-probs, loss) is the real step's."""

    name = "replay"

    def __init__(self, rollouts_path: str, step: int) -> None:
        self.ids: dict[str, dict[int, list[int]]] = {}
        for line in Path(rollouts_path).read_text().splitlines():
            r = json.loads(line)
            if r["step"] == step:
                group = self.ids.setdefault(str(r["record"]["problem_id"]), {})
                group[r["sample_index"]] = r["completion_ids"]

    def sample(
        self, module: Any, batch: dict[str, Any], vision: dict[str, Any] | None, sampling: Sampling
    ) -> Sampled:
        G = sampling.num_generations
        rows = []
        for record in batch["records"]:
            recorded = self.ids.get(record.problem_id, {})
            if sorted(recorded) != list(range(G)):
                raise KeyError(f"no {G} recorded rollouts of {record.problem_id} (have {sorted(recorded)})")
            rows += [torch.tensor(recorded[g], dtype=torch.long) for g in range(G)]
        pad = module.backbone.pad_token_id
        ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)  # [N*G, T]
        return Sampled(module.backbone.completions_from_ids(ids, sampling.max_new_tokens), None)


class ReplayGRPOModule(GRPOModule):
    """`GRPOModule` whose rollouts are the ones recorded at `replay_step` in `replay_path` (`ReplayedRollouts`)."""

    def __init__(self, replay_path: str, replay_step: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.engine = ReplayedRollouts(replay_path, replay_step)
