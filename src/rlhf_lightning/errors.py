"""Errors about the user's input: the CLI prints them as one line and exits with status 2.

Each names where the problem is (file, row, field, option) and what was expected. Anything else that
escapes is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input the user can act on."""


class DataSourceError(InputError):
    """A data source that cannot be read at all (missing, empty, undecodable, unknown kind)."""


class DataFormatError(InputError):
    """A row that cannot be read; the message names the row, the field and what was expected."""


class ModelLoadError(InputError):
    """A model or tokenizer name that cannot be resolved; the message says what was expected."""


class ConfigurationError(InputError):
    """Options that do not fit together (e.g. a minibatch that does not divide the rollout batch)."""


class StorageError(Exception):
    """The disk refused a write (full, read-only); the message names the file and the space left. The CLI
    prints it as one line and exits with status 1."""


class StageStopped(Exception):
    """A stage was stopped by SIGTERM or Ctrl-C before it finished: nothing was exported for it."""

    def __init__(self, stage: str, signal_name: str, checkpoint: str | None):
        self.stage, self.signal_name, self.checkpoint = stage, signal_name, checkpoint
        saved = f"its latest checkpoint is {checkpoint}" if checkpoint else "no checkpoint of it was written"
        super().__init__(f"the {stage} stage was stopped by {signal_name} before it finished; {saved}")

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + the signal's number."""
        return 143 if self.signal_name == "SIGTERM" else 130
