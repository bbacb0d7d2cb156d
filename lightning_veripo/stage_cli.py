"""The LightningCLI of one stage: `veripo fit / validate / test / predict`, and each fit the loop runs.

Any LightningModule and data module of this package is chosen by `class_path` in the YAML. The loop
(`lightning_veripo.loop`) runs every stage through this class; `lightning_veripo.cli` is the `veripo` command
around it and the loop.
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning_veripo.console import fix_progress_bar
from lightning_veripo.evaluate import refuse_renamed_keys
from lightning_veripo.module import VideoLLMModule

# A config key whose value is a secret (OpenAIJudge's api_key): written out as MASKED, never as given.
_SECRET_KEY = re.compile(r"(?:^|_)(?:api_key|password|secret)$")
MASKED = "***"


def _mask_secrets(value: Any) -> None:
    """Replace, in place, every non-empty value of a secret key in a parsed config (nested anywhere)."""
    items = vars(value) if isinstance(value, Namespace) else value if isinstance(value, dict) else None
    if items is not None:
        for key, inner in items.items():
            if _SECRET_KEY.search(str(key)) and isinstance(inner, str) and inner:
                items[key] = MASKED
            else:
                _mask_secrets(inner)
    elif isinstance(value, list | tuple):
        for inner in value:
            _mask_secrets(inner)


class MaskedSaveConfigCallback(SaveConfigCallback):
    """Lightning's config.yaml of a run, with every secret (an `api_key` given in the config) masked: a key
    belongs in the environment (`OPENAI_API_KEY`, or the variable `api_key_env` names), never in a run's files."""

    def __init__(self, parser: Any, config: Namespace, *args: Any, **kwargs: Any) -> None:
        config = config.clone()
        _mask_secrets(config)
        super().__init__(parser, config, *args, **kwargs)


class VeripoCLI(LightningCLI):
    """LightningCLI with this package's modules and data modules chosen by `class_path` in the YAML.

    Without subcommands (`run=False`, as the loop runs each stage) the parser takes `veripo fit`'s arguments,
    so its errors point to `veripo fit --help`. The config.yaml a run saves has its secrets masked."""

    def __init__(
        self,
        args: list[str] | dict | None = None,
        run: bool = True,
        parser_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        # the usage line and an error's "run: <prog> --help" tip name this command however it was started
        parser_kwargs = {"prog": "veripo" if run else "veripo fit", **(parser_kwargs or {})}
        refuse_renamed_keys(list(args) if isinstance(args, list) else sys.argv[1:] if args is None else [])
        super().__init__(
            model_class=VideoLLMModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=MaskedSaveConfigCallback,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=parser_kwargs,
            args=args,
            run=run,
            **kwargs,
        )

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning's arguments for `subcommand`, with every checkpoint (`--ckpt_path`, a URL too, for which
        Lightning would default to a full unpickle that can run code) loaded weights-only."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "ckpt_path" in inspect.signature(getattr(Trainer, subcommand)).parameters:
            kwargs["weights_only"] = (
                True  # whatever --weights_only says: veripo's own checkpoints need no more
            )
        return kwargs

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, its rich progress bar reading `Epoch 12` (not `Epoch 12/-2`) under `max_steps`."""
        trainer = super().instantiate_trainer(**kwargs)
        fix_progress_bar(trainer)
        return trainer
