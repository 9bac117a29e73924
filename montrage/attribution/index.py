"""The training-side index of a store, built once at fit time, so that a query neither re-reads the store nor
re-ranks the training trajectories, and for large stores touches only a few thousand images.

The fit writes, beside the attribution models (`<model dir>/index/`):
  traj_<layer>.npy   (N, E, T, F) float16   the trajectories, image-major (a query reads its rows contiguously)
  ranks_<layer>_<v>.npy (N, D) float16      the ranked change trajectories (the Spearman features' training side)
  final_<layer>.npy  (N, T, F) float16      the final snapshot (fast mode holds its centred unit views in memory)
  nn.npy             (N, d) float16         centred, unit final-snapshot features: the shortlist's index
  reference.npy      (R,) int64             every image up to `EXACT`; beyond, a stratified sample
Up to `EXACT` images a query scores every image exactly. Beyond, it scores its shortlist (the K nearest images in
the final snapshot, exact inner-product search) and the reference sample with the full model; the reference sample
supplies the per-query standardization and, for the images outside the shortlist, their concept's mean score (a
stratified estimate of the concept scores).
"""

from __future__ import annotations

import json
import os

import numpy as np

from montrage.attribution.pairs import (
    Mode,
    _unit,
    final_features,
    final_side,
    per_query_standardize,
    side_features,
    train_ranks,
    trajectory_side,
)
from montrage.errors import MontrageError

EXACT = 4096  # monitored images up to which queries score every image
SHORTLIST = 1000
REFERENCE = 2048
VERSION = 1


def nn_vectors(final: dict[str, np.ndarray], centre: dict[str, np.ndarray]) -> np.ndarray:
    """(n, d): per layer the centred final-snapshot features (all timesteps), unit-normed, layers side by side."""
    parts = []
    for layer, x in final.items():  # x (n, T, F) of the last snapshot
        c = x.astype(np.float32) - centre[layer][-1][None]
        parts.append(_unit(c.reshape(len(c), -1)))
    return _unit(np.concatenate(parts, axis=1))


def reference_rows(concepts: list[str], size: int, seed: int = 0) -> np.ndarray:
    """A fixed sample of `size` rows, the same share of every concept (at least 2 per concept)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(concepts)
    out = []
    for c in sorted(set(concepts)):
        rows = np.flatnonzero(labels == c)
        k = min(len(rows), max(2, int(round(size * len(rows) / len(labels)))))
        out.append(rng.choice(rows, k, replace=False))
    return np.sort(np.concatenate(out))


class RowFile:
    """An .npy file read and written a row at a time with pread/pwrite: no memory map, so the pages it touches stay
    in the page cache instead of the process's resident memory (a fit over 100,000 images stays bounded)."""

    def __init__(self, path: str, mode: str = "r", dtype=np.float16, shape: tuple | None = None):
        if mode == "w":
            np.lib.format.open_memmap(path, "w+", dtype, shape).flush()  # header and size only; the map is dropped
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, _, self.dtype = read(fh)
            self.offset = fh.tell()
        self.row_shape = tuple(self.shape[1:])
        self.row_bytes = int(np.prod(self.row_shape)) * np.dtype(self.dtype).itemsize
        self.fd = os.open(path, os.O_RDWR if mode == "w" else os.O_RDONLY)

    def __len__(self) -> int:
        return int(self.shape[0])

    def write(self, start: int, values: np.ndarray) -> None:
        os.pwrite(self.fd, np.ascontiguousarray(values, self.dtype).tobytes(), self.offset + start * self.row_bytes)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows (sorted or not); runs of consecutive rows are read with one call."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8).reshape(len(rows), self.row_bytes)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            data = os.pread(self.fd, (j - i) * self.row_bytes, self.offset + int(rows[i]) * self.row_bytes)
            flat[i:j] = np.frombuffer(data, np.uint8).reshape(j - i, self.row_bytes)
            i = j
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def build_index(store, centre: dict, out_dir: str, block: int = 4096, progress: bool = True) -> dict:
    """Write the index of every monitored image (one pass over the store, a block at a time)."""
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    n, E, layers = store.num_train, store.num_epochs, store.layers
    traj, ranks, final, nn = {}, {}, {}, None
    bar = tqdm(total=n, desc="montrage: attribution index", unit="image", disable=not progress or n < 4096, leave=False)
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        feats = {layer: store.train_features(layer, rows) for layer in layers}
        for layer, x in feats.items():
            if layer not in traj:
                traj[layer] = RowFile(
                    os.path.join(out_dir, f"traj_{layer}.npy"), "w", shape=(n, *x.shape[:1], *x.shape[2:])
                )
            traj[layer].write(start, x.transpose(1, 0, 2, 3))
            if layer not in final:
                final[layer] = RowFile(os.path.join(out_dir, f"final_{layer}.npy"), "w", shape=(n, *x.shape[2:]))
            final[layer].write(start, x[-1])
        for key, r in train_ranks(feats, centre).items():
            if r is None:
                continue
            if key not in ranks:
                ranks[key] = RowFile(os.path.join(out_dir, f"ranks_{key[0]}_{key[1]}.npy"), "w", shape=(n, r.shape[1]))
            ranks[key].write(start, r)
        v = nn_vectors({layer: x[-1] for layer, x in feats.items()}, centre)
        if nn is None:
            nn = RowFile(os.path.join(out_dir, "nn.npy"), "w", shape=(n, v.shape[1]))
        nn.write(start, v)
        bar.update(rows.stop - rows.start)
    bar.close()
    for f in [*traj.values(), *ranks.values(), *final.values(), nn]:
        f.close()
    ref = np.arange(n) if n <= EXACT else reference_rows([e.concept for e in store.train], REFERENCE)
    np.save(os.path.join(out_dir, "reference.npy"), ref)
    meta = {
        "version": VERSION,
        "num_train": n,
        "num_epochs": E,
        "layers": layers,
        "ranks": [list(k) for k in ranks],
        "store_identity": store.spec["identity"],
    }
    with open(os.path.join(out_dir, "index.json"), "w") as fh:
        json.dump(meta, fh)
    return meta


class TrainIndex:
    """The index read back (memory-mapped); `rows` of it as the training side of `pair_features`."""

    def __init__(self, out_dir: str, store):
        with open(os.path.join(out_dir, "index.json")) as fh:
            self.meta = json.load(fh)
        if (
            self.meta.get("store_identity") != store.spec["identity"]
            or self.meta["num_epochs"] != store.num_epochs
            or self.meta["num_train"] != store.num_train
        ):
            raise MontrageError(
                f"attribution index {out_dir!r} was built for another store or an earlier state of "
                f"{store.path!r}; re-run `montrage attribute fit {store.path}`."
            )
        self.dir = out_dir
        missing = [
            n
            for n in [
                "reference.npy",
                "nn.npy",
                *(f"{k}_{layer}.npy" for k in ("traj", "final") for layer in self.meta["layers"]),
            ]
            if not os.path.isfile(os.path.join(out_dir, n))
        ]
        if missing:
            raise MontrageError(
                f"attribution index {out_dir!r} lacks {', '.join(missing)}; re-run `montrage attribute fit {store.path}`."
            )
        load = lambda name: RowFile(os.path.join(out_dir, name))  # noqa: E731
        self.reference = np.load(os.path.join(out_dir, "reference.npy"))
        self.traj = {layer: load(f"traj_{layer}.npy") for layer in self.meta["layers"]}
        self.ranks = {(layer, int(v)): load(f"ranks_{layer}_{v}.npy") for layer, v in self.meta["ranks"]}
        self.nn = np.load(os.path.join(out_dir, "nn.npy")).astype(np.float32)  # in memory: every query searches it all
        self._final_side: dict = {}  # centre digest -> final_side of every image: fast mode's training side
        # (mode, centre digest, first row, rows) -> the prepared training side of reference rows (the sample, or up to
        # REFERENCE images): trajectory_side, or rows of final_side
        self._reference_sides: dict = {}

    def close(self) -> None:
        for f in [*self.traj.values(), *self.ranks.values()]:
            f.close()

    def train_block(self, rows: np.ndarray) -> tuple[dict, dict]:
        """({layer: (E, n, T, F)}, ranks) of sorted `rows` of the trajectories, read from disk."""
        feats = {layer: t.read(rows).transpose(1, 0, 2, 3) for layer, t in self.traj.items()}
        return feats, {k: r.read(rows) for k, r in self.ranks.items()}

    def final_side(self, centre: dict) -> dict:
        """`table.final_side` of every image's final snapshot, computed once per centre: a fast query then costs one
        gather and one product per view."""
        key = _digest(centre)
        if key not in self._final_side:
            final = {layer: np.load(os.path.join(self.dir, f"final_{layer}.npy")) for layer in self.meta["layers"]}
            self._final_side = {key: final_side(final, centre)}
        return self._final_side[key]

    def pair_features(
        self, queries: dict, rows: np.ndarray, centre: dict, mode: Mode, reference: bool = False
    ) -> np.ndarray:
        """`table.pair_features` of queries {layer: (E, Q, T, F)} against the training images `rows` (sorted), read
        from the index; `reference`: rows of the reference sample, whose prepared side is kept in memory."""
        key = (mode, _digest(centre), int(rows[0]), len(rows))
        side = self._reference_sides.get(key) if reference else None
        if side is None:
            if mode == "final":
                side = {k: v[rows] for k, v in self.final_side(centre).items()}
            else:
                feats, ranks = self.train_block(rows)
                side = trajectory_side(feats, centre, ranks)
            if reference and (len(self.reference) <= REFERENCE or len(self.reference) < self.meta["num_train"]):
                self._reference_sides[key] = side
        if mode == "final":
            return final_features(final_side({k: q[-1] for k, q in queries.items()}, centre), side)
        return side_features(trajectory_side(queries, centre), side)

    def shortlist(self, final_query: dict[str, np.ndarray], centre: dict, k: int) -> np.ndarray:
        """(Q, k) rows of the k training images nearest each query in the final snapshot (exact inner product)."""
        import torch

        q = torch.from_numpy(nn_vectors(final_query, centre))
        return _top((q @ torch.from_numpy(self.nn).T).numpy(), min(k, len(self.nn)))  # torch: its threads, not BLAS's


def score_large(
    model,
    index: TrainIndex,
    queries: dict,
    centre: dict,
    mode: Mode,
    concept: np.ndarray,
    k: int = SHORTLIST,
    block: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, N), scored (Q, N) bool); `concept` (N,) is each image's concept index. The reference rows are scored exactly (all images up to `EXACT`); beyond,
    each query's shortlist too, and every other image gets its concept's mean score over the reference rows
    outside that shortlist (so the concept means are a stratified estimate)."""
    qm, cm = _mode_q(queries, mode), mode_centre(centre, mode)
    Q, N, ref = next(iter(qm.values())).shape[1], len(concept), index.reference
    blocks = [ref[i : i + block] for i in range(0, len(ref), block)]

    def x_of(rows, q=slice(None), reference=False):
        return index.pair_features({layer: v[:, q] for layer, v in qm.items()}, rows, cm, mode, reference)

    keep = Q * len(ref) <= 4_000_000  # the reference pair features fit in memory: compute them once
    xs, s1, s2 = [], 0.0, 0.0
    for rows in blocks:
        x = x_of(rows, reference=True).astype(np.float64)
        s1, s2 = s1 + x.sum(axis=1, keepdims=True), s2 + (x**2).sum(axis=1, keepdims=True)
        if keep:
            xs.append(x)
    mean = s1 / len(ref)
    std = np.sqrt(np.maximum(s2 / len(ref) - mean**2, 0.0))
    ref_scores = np.concatenate(
        [
            model.score(per_query_standardize(xs[i] if keep else x_of(rows, reference=True), (mean, std))).numpy()
            for i, rows in enumerate(blocks)
        ],
        axis=1,
    )
    scores = np.zeros((Q, N), np.float32)
    scored = np.zeros((Q, N), bool)
    scores[:, ref], scored[:, ref] = ref_scores, True
    if len(ref) == N:
        return scores, scored
    short = index.shortlist({layer: v[-1] for layer, v in queries.items()}, centre, k)
    C, ref_concept = int(concept.max()) + 1, concept[ref]
    in_ref = np.zeros(N, bool)
    in_ref[ref] = True
    count = np.maximum(np.bincount(ref_concept, minlength=C), 1)
    for q in range(Q):
        rows = np.sort(short[q])
        s = model.score(per_query_standardize(x_of(rows, slice(q, q + 1)), (mean[q : q + 1], std[q : q + 1]))).numpy()[
            0
        ]
        # images outside the shortlist and the sample: their concept's mean over the sample outside the shortlist
        outside = np.ones(len(ref), bool)
        outside[np.searchsorted(ref, rows[in_ref[rows]])] = False
        total = np.bincount(ref_concept, ref_scores[q], C)
        part = np.bincount(ref_concept[outside], ref_scores[q][outside], C)
        part_count = np.bincount(ref_concept[outside], minlength=C)
        fill = np.where(part_count > 0, part / np.maximum(part_count, 1), total / count)
        scores[q] = np.where(scored[q], scores[q], fill[concept])
        scores[q, rows], scored[q, rows] = s, True
    return scores, scored


def _digest(centre: dict) -> tuple:
    return tuple((k, np.asarray(v, np.float32).tobytes()) for k, v in sorted(centre.items()))


def _top(sim: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) column indices of each row's k largest values (unordered)."""
    return np.argpartition(-sim, k - 1, axis=1)[:, :k]


def mode_centre(centre: dict, mode: Mode) -> dict:
    return {k: v[-1:] for k, v in centre.items()} if mode == "final" else centre


def _mode_q(queries: dict, mode: Mode) -> dict:
    return {k: v[-1:] for k, v in queries.items()} if mode == "final" else queries
