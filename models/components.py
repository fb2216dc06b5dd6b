"""Sharing pipeline components between models.

diffusers loads a folder's components afresh every time, even when two
pipelines point at the same VAE or text encoder. Hearth keys each loaded
component by its class and the files it was loaded from (device, inode, size
and change time of every file, symlinks resolved), so a component folder that
two pipelines both reference, by symlink, hard link or a shared cache blob, is
loaded once and the same object serves both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FileSet = tuple[tuple[int, int, int, int], ...]
ComponentKey = tuple[str, FileSet]

# Schedulers are kept by each model's runner (workers.images) and tokenizers are
# cheap: neither is shared.
NOT_SHARED = frozenset({"scheduler", "tokenizer", "tokenizer_2", "tokenizer_3"})


def file_set(folder: Path) -> FileSet:
    """The identity of the files under ``folder``, as the file system sees them."""
    identities = []
    for root, _dirs, files in os.walk(folder.resolve(), followlinks=True):
        for name in files:
            stat = (Path(root) / name).resolve().stat()
            identities.append((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(identities))


class ComponentCache:
    """Loaded components of one worker (one device and dtype), by class and files."""

    def __init__(self) -> None:
        self._components: dict[ComponentKey, Any] = {}

    @staticmethod
    def key(class_name: str, folder: Path) -> ComponentKey:
        return (class_name, file_set(folder))

    def get(self, key: ComponentKey) -> Any | None:
        return self._components.get(key)

    def put(self, key: ComponentKey, component: Any) -> None:
        self._components.setdefault(key, component)

    def __len__(self) -> int:
        return len(self._components)
