"""The `veripo` command: LightningCLI fit / validate / test, plus the offline builders.

    veripo fit --config configs/demo_grpo.yaml          # any LightningModule of this package, any YAML
    veripo iterate --config configs/demo.yaml            # the VerIPO loop: GRPO -> verifier -> DPO, repeated
    veripo make-tiny-model DIR [--seed 0] [--arch qwen2_5_vl|qwen2_vl|qwen3_vl]   # tiny random Qwen-VL
    veripo make-synthetic-data DIR --num_train N --num_val M [--seed 0]   # --num-train etc. work too
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from lightning_veripo.backbone import PolicyMismatchError
from lightning_veripo.module import VideoLLMModule


class VeripoCLI(LightningCLI):
    """LightningCLI with this package's modules and data modules chosen by `class_path` in the YAML."""

    def __init__(self, args: list[str] | dict | None = None, run: bool = True, **kwargs) -> None:
        import lightning as L

        super().__init__(
            model_class=VideoLLMModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )


def _underscore_flags(args: list[str]) -> list[str]:
    """`--num-train 4` -> `--num_train 4`: the builders' flags are their parameter names (jsonargparse)."""
    out = []
    for arg in args:
        if arg.startswith("--"):
            flag, sep, value = arg[2:].partition("=")
            arg = "--" + flag.replace("-", "_") + sep + value
        out.append(arg)
    return out


def _command(argv: list[str]) -> int | None:
    """The commands that are plain functions (jsonargparse reads their typed signatures); None for fit & co."""
    from jsonargparse import auto_cli

    from lightning_veripo.data.synthetic import make_synthetic_data
    from lightning_veripo.loop import iterate
    from lightning_veripo.tiny import make_tiny_model

    commands = {"make-tiny-model": make_tiny_model, "make-synthetic-data": make_synthetic_data, "iterate": iterate}
    if not argv or argv[0] not in commands:
        return None
    args = argv[1:] if argv[0] == "iterate" else _underscore_flags(argv[1:])
    out = auto_cli(commands[argv[0]], args=args)
    if argv[0] != "iterate":
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _command(args)
        if code is not None:
            return code
        VeripoCLI(args=argv)
    except PolicyMismatchError as err:  # a checkpoint of another policy: the message says what to set
        print(f"veripo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
