"""The `veripo` command: LightningCLI fit / validate / test / predict, the VerIPO loop, and the offline builders.

veripo --help                                   # every command, one line each
veripo fit --config configs/demo_grpo.yaml      # any LightningModule of this package, any YAML
veripo iterate --config configs/demo.yaml       # the VerIPO loop: GRPO -> verifier -> DPO, repeated
veripo make-tiny-model DIR [--seed 0] [--arch qwen2_5_vl|qwen2_vl|qwen3_vl|qwen3_5|qwen3_5_moe]   # tiny random Qwen-VL
veripo make-synthetic-data DIR --num_train N --num_val M [--seed 0]           # --num-train etc. work too
veripo verify ROLLOUTS_JSONL OUT_DIR [--judge ...]   # the verifier alone, on saved rollouts
veripo evaluate --policy.base_model M --benchmark.name vsibench --benchmark.path F   # a video benchmark

An error under a command ends with a tip naming that command's help (`veripo iterate --help`); an error in a
loop stage's arguments names `veripo fit --help`, the options a stage takes.
"""

from __future__ import annotations

import difflib
import json
import sys

from jsonargparse import auto_cli
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_veripo import preemption
from lightning_veripo.data.synthetic import make_synthetic_data
from lightning_veripo.data.videoqa import VideoQAError
from lightning_veripo.evaluate import RenamedKeyError, refuse_renamed_keys
from lightning_veripo.loop import iterate
from lightning_veripo.policy import PolicyMismatchError
from lightning_veripo.preemption import Preempted
from lightning_veripo.stage_cli import VeripoCLI
from lightning_veripo.tiny import make_tiny_model
from lightning_veripo.verifier.run import run_verifier_from_files
from lightning_veripo.videobench.runner import evaluate_benchmark
from lightning_veripo.workdir_lock import WorkDirLockedError

# Every command with its line in `veripo --help`: LightningCLI's four, then the plain functions below.
COMMANDS = {
    "fit": "train one stage (GRPO, DPO or SFT) from a YAML config",
    "validate": "evaluate a model or a --ckpt_path on the validation set",
    "test": "evaluate a model or a --ckpt_path on a test file",
    "predict": "run a model's predict_step over a data set",
    "iterate": "run the VerIPO loop: GRPO -> verifier -> DPO, repeated",
    "evaluate": "score a policy on a video benchmark (VSI-Bench, Video-MME, MVBench, ...) as its authors do",
    "make-tiny-model": "write the offline tiny random Qwen-VL to a directory",
    "make-synthetic-data": "write the synthetic video-QA task to a directory",
    "verify": "judge a saved rollouts.jsonl again and write verdicts, pairs and stats (e.g. with another judge)",
}


def overview() -> str:
    """`veripo --help`: every command with one line."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: veripo COMMAND [options]",
        "",
        "VerIPO for Video-LLMs on PyTorch Lightning.",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {line}" for name, line in COMMANDS.items()),
        "",
        "examples:",
        "  veripo iterate --config configs/demo.yaml",
        "  veripo fit --config configs/demo_grpo.yaml",
        "",
        "Run `veripo COMMAND --help` for a command's options.",
    ]
    return "\n".join(lines)


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
    commands = {
        "make-tiny-model": make_tiny_model,
        "make-synthetic-data": make_synthetic_data,
        "iterate": iterate,
        "verify": run_verifier_from_files,
        "evaluate": evaluate_benchmark,
    }
    if not argv or argv[0] not in commands:
        return None
    args = argv[1:] if argv[0] == "iterate" else _underscore_flags(argv[1:])
    if argv[0] == "iterate":
        refuse_renamed_keys(args)
    # prog: usage lines and the "tip: ... run: <prog> --help" of an error name this command, not bare `veripo`
    out = auto_cli(commands[argv[0]], args=args, prog=f"veripo {argv[0]}")
    if argv[0] == "verify":
        print(json.dumps(out, indent=2))
    elif argv[0] != "iterate":
        print(f"wrote {out}")
    return 0


def _usage_error(message: str, full: bool = False) -> int:
    usage = overview() if full else "usage: veripo COMMAND [options]\ntip: `veripo --help` lists the commands"
    print(f"{usage}\nveripo: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return _usage_error("no command given", full=True)
    if args[0] in ("-h", "--help"):
        print(overview())
        return 0
    if not args[0].startswith("-") and args[0] not in COMMANDS:
        close = difflib.get_close_matches(args[0], COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return _usage_error(f"unknown command {args[0]!r}{hint}")
    try:
        code = _command(args)
        if code is not None:
            return code
        VeripoCLI(args=argv)  # None: LightningCLI reads sys.argv itself (a list here would make it warn)
    except (PolicyMismatchError, RenamedKeyError, VideoQAError) as err:  # the message says what to fix
        print(f"veripo: error: {err}", file=sys.stderr)
        return 2
    except WorkDirLockedError as err:  # another run owns the work directory: nothing was touched
        print(f"veripo: error: {err}", file=sys.stderr)
        return 1
    except Preempted as err:  # the loop stopped on SIGTERM at a safe point
        print(f"veripo: {err}; the same command resumes from there.", file=sys.stderr, flush=True)
        return preemption.EXIT_CODE
    except SIGTERMException:  # `veripo fit`: Lightning stopped the fit after its last checkpoint
        print(
            f"veripo: {args[0]} stopped by SIGTERM after its last checkpoint; run it again with --ckpt_path "
            "set to that checkpoint (e.g. <checkpoints dir>/last.ckpt) to resume.",
            file=sys.stderr,
            flush=True,
        )
        return preemption.EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
