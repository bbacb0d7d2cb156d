"""What `veripo iterate` prints, and the library noise it keeps off the console.

Convention: what is happening (a header per stage, a skipped stage and why, evaluation progress) goes to stderr,
like the progress bars; the result (the summary table, where the files are) goes to stdout, so
`veripo iterate ... > results.txt` keeps the results and still shows the progress.

`quiet()` silences, for the run it wraps, messages that say nothing to a user of the loop and repeat every stage:

- LightningCLI's "args parameter is intended to run from within Python" warning with the whole argument list
  (the loop builds each stage's CLI from a list of arguments on purpose);
- Lightning's litlogger / litmodels tips;
- ModelCheckpoint's warning (and 12-line example) about manual optimization: the loop checkpoints every step
  on purpose, after the optimizer step, which is the state a resumed fit needs;
- peft's "Setting `save_embedding_layers` to `True`" when a stage's adapter is saved: peft only says it when
  the LoRA targets an embedding layer (the demo's SFT targets lm_head), i.e. when the settings ask for it.

Every other warning still shows. The filters are installed once around the whole loop, not per stage: changing
the filters makes Python forget which warnings it has shown, so a warning it shows once per location would
come back at every stage.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar

# message prefixes (regular expressions matched at the start of a warning's text)
NOISE_WARNINGS = (
    r"LightningCLI's args parameter is intended to run from within Python",
    r"Using ModelCheckpoint with manual optimization",
    r"Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`",
    # by design, once per stage: the SFT data module has a validation file the SFT module does not use; the frozen
    # vision tower sits in eval mode; the modules move their own batches (records stay on the host)
    r"You passed in a `val_dataloader` but have no `validation_step`",
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a `LightningDataModule`",
    # deprecations inside Lightning and transformers, not in anything a user of the loop calls
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"`is_gradient_checkpointing` is deprecated",
)
# the logger Lightning's rank_zero_info writes to, and what its tips mention
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
NOISE_INFO = ("litlogger", "litmodels")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip") and any(name in message for name in NOISE_INFO))


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the noise listed in the module docstring while the block runs."""
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    tips = _DropTips()
    with warnings.catch_warnings():
        for message in NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        logger.addFilter(tips)
        try:
            yield
        finally:
            logger.removeFilter(tips)


class _Hold(logging.Filter):
    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextmanager
def held_back(loggers: tuple[str, ...] = ("lightning.pytorch", "lightning.fabric")) -> Iterator[None]:
    """Hold back what these loggers' handlers print while the block runs ("Seed set to 0", "GPU available:
    ..." when a stage's trainer is built) and print it when the block ends, so the stage's header, printed
    inside the block once the trainer exists, comes first."""
    holds = [_Hold(handler) for name in loggers for handler in logging.getLogger(name).handlers]
    for hold in holds:
        hold.handler.addFilter(hold)
    try:
        yield
    finally:
        for hold in holds:
            hold.handler.removeFilter(hold)
            for record in hold.records:
                hold.handler.handle(record)


def say(line: str = "") -> None:
    """A status line of the loop (stderr, flushed so it lands between the progress bars in order)."""
    print(line, file=sys.stderr, flush=True)


def header(title: str, *details: str) -> None:
    """A stage's header: a rule with the title, then one indented line per detail."""
    say()
    say(f"== {title}")
    for detail in details:
        say(f"   {detail}")


class StepsRichProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without the `Epoch 12/-2` of a fit bounded by `max_steps` only
    (`max_epochs` is -1 there): it reads `Epoch 12` then, and `Epoch 12/N` when there is an epoch bound."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        if len(self.validation_description) > len(description):  # as Lightning pads it, against flicker
            description = f"{description:{len(self.validation_description)}}"
        return description


def fix_progress_bar(trainer: Any) -> None:
    """Make the trainer's rich progress bar (Lightning's default one when rich is installed, or one configured
    with its settings) a `StepsRichProgressBar`, keeping its settings. Subclasses are left alone."""
    for callback in trainer.callbacks:
        if type(callback) is RichProgressBar:
            callback.__class__ = StepsRichProgressBar


def plural(n: int, word: str, many: str | None = None) -> str:
    """`n word` with the word in the plural unless n is 1; `many` for a plural the rule gets wrong ("epochs")."""
    if n == 1:
        return f"{n} {word}"
    if many is not None:
        return f"{n} {many}"
    return f"{n} {word}es" if word.endswith(("s", "x", "ch", "sh")) else f"{n} {word}s"
