"""Which training images each optimizer step saw, for loops whose batches carry no index.

`wrap_dataloader(loader)` returns a DataLoader over the same sampler whose dict batches gain `montrage_index` (the
dataset indices), also when the user's collate drops unknown keys: the wrapper collates the user's items with the
user's collate and adds the indices after. The dataset and collate are wrapped, not the loader's iterator, so the
indices survive `accelerator.prepare` (which rebuilds the loader from its dataset, sampler and collate).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

INDEX_KEY = "montrage_index"
INDEX_KEYS = (INDEX_KEY, "index")  # `index`: montrage's recipes and ConceptImageDataset


class IndexedDataset(torch.utils.data.Dataset):
    """Items as (dataset index, item); other attributes are the wrapped dataset's."""

    montrage_wrapped = True

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return int(i), self.dataset[i]

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class IndexedCollate:
    """The user's collate over the items, then the indices added under `montrage_index`."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        indices = [i for i, _ in items]
        batch = self.collate([x for _, x in items])
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"wrap_dataloader needs batches that are dicts (got a {type(batch).__name__}); pass the "
                "batch's dataset indices to Monitor.on_batch(indices=...) instead."
            )
        batch = dict(batch) if not hasattr(batch, "__setitem__") else batch
        batch[INDEX_KEY] = torch.tensor(indices, dtype=torch.long)
        return batch


def wrap_dataloader(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """The same loader (dataset, sampler, workers, generator) whose batches also carry their dataset indices."""
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        raise TypeError(
            "wrap_dataloader needs a map-style dataset (an IterableDataset has no indices); pass ids to "
            "Monitor.on_batch(ids=...) instead."
        )
    kw = dict(
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kw["prefetch_factor"] = loader.prefetch_factor
    return torch.utils.data.DataLoader(
        IndexedDataset(loader.dataset),
        batch_sampler=loader.batch_sampler,
        collate_fn=IndexedCollate(loader.collate_fn),
        **kw,
    )


def batch_indices(batch) -> np.ndarray | None:
    """Dataset indices a batch carries (`montrage_index` or `index`), or an index sequence itself; None if none."""
    if isinstance(batch, Mapping):
        for key in INDEX_KEYS:
            if key in batch:
                return batch_indices(batch[key])
        return None
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu().reshape(-1).numpy().astype(np.int64)
    if isinstance(batch, (list, tuple, np.ndarray)):
        try:
            return np.asarray([int(i) for i in np.asarray(batch).reshape(-1)], dtype=np.int64)
        except (TypeError, ValueError):
            return None
    return None
