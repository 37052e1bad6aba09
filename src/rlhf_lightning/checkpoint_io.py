"""Checkpoints written straight to disk.

Lightning's ``TorchCheckpointIO`` serialises a checkpoint into an in-memory buffer and copies it out
(``BytesIO.getvalue``) before writing it: saving the PPO stage's 2.3 GB checkpoint (policy, critic and
their AdamW state) held up to twice that in RAM on top of the models, the run's memory peak.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rlhf_lightning.errors import StorageError


class StreamingCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that streams local checkpoints to a temporary file beside the target and
    renames it into place: atomic like Lightning's, without the in-memory copy. Remote filesystems
    (fsspec URLs) keep Lightning's way.

    Every stage's CLI installs it unless the trainer was given a checkpoint plugin of its own. A write the
    disk refuses (full: torch reports it as an ``OSError`` or a ``RuntimeError`` from its zip writer) is a
    :class:`~rlhf_lightning.errors.StorageError` naming the file and the space left; the previous
    checkpoint at that path stays whole.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as error:
            free = shutil.disk_usage(path.parent).free / 2**20
            kept = (
                f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} exists"
            )
            raise StorageError(
                f"could not write the checkpoint {path} ({error}); {free:,.0f} MiB free on its disk, {kept}"
            ) from error
        finally:
            tmp.unlink(missing_ok=True)
