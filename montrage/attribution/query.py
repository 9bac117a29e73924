"""Offline attribution queries: which training concepts and images influenced a new image.

Full mode encodes the query with every stored epoch's adapter snapshot and scores it with the trajectory model;
fast mode encodes it once with the final weights and uses the final-epoch model.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import torch

from montrage.attribution.fit import check_model_meta, default_model_dir
from montrage.attribution.model import AttributionModel, AttributionModelError
from montrage.attribution.pairs import Mode, iter_train_blocks, pair_features, per_query_standardize, train_centre
from montrage.data import load_image, read_example
from montrage.encode import stable_seed
from montrage.store import StoreReader
from montrage.store_model import StoreModel


def query_seed(pixels: torch.Tensor) -> int:
    """A fixed noise seed per query image, derived from its pixels (the same image always gets the same epsilon)."""
    return stable_seed("query/" + hashlib.sha1(pixels.numpy().tobytes()).hexdigest())


def score_pairs(
    model: AttributionModel,
    store: StoreReader,
    queries: dict[str, np.ndarray],
    centre: dict,
    mode: Mode,
    block: int = 4096,
) -> np.ndarray:
    """(Q, N) scores of queries {layer: (E, Q, T, F)} against all training images, streamed in blocks.

    Two passes when the training set spans several blocks: the first gathers the per-query statistics used by
    `per_query_standardize`, the second scores.
    """
    n = store.num_train
    if n <= block:
        _, train = next(iter_train_blocks(store, block))
        return model.score(per_query_standardize(pair_features(queries, train, centre, mode))).numpy()
    s1 = s2 = 0.0
    for _, train in iter_train_blocks(store, block):
        x = pair_features(queries, train, centre, mode).astype(np.float64)
        s1, s2 = s1 + x.sum(axis=1, keepdims=True), s2 + (x**2).sum(axis=1, keepdims=True)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    out = [
        model.score(per_query_standardize(pair_features(queries, train, centre, mode), (mean, std))).numpy()
        for _, train in iter_train_blocks(store, block)
    ]
    return np.concatenate(out, axis=1)


_BLAS = None


def _one_blas_thread():
    """NumPy's BLAS held to one thread while torch scores: on few cores their two thread pools, both spinning
    between calls, otherwise take turns (docs/results.md, "Scale")."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


class Attributor:
    """`Attributor.from_store(path).query(images)`: concept scores and top-K training images per query."""

    def __init__(
        self,
        store_path: str,
        model_dir: str | None = None,
        model_path: str | None = None,
        device: str = "cpu",
        shortlist: int = 1000,
    ):
        self.store = StoreReader(store_path)
        self.model_dir = model_dir or default_model_dir(store_path)
        self.model_path, self.device = model_path, device
        self.models: dict[str, AttributionModel] = {}
        for mode in ("trajectory", "final"):
            model, meta = AttributionModel.load(os.path.join(self.model_dir, mode))
            check_model_meta(meta, self.store, os.path.join(self.model_dir, mode))
            self.models[mode] = model
        self.train = self.store.train
        self.concepts = sorted({e.concept for e in self.train})
        self.centre = train_centre(self.store)
        self.labels = np.array([e.concept for e in self.train])
        self.concept_ids = np.searchsorted(self.concepts, self.labels)  # (N,) index into self.concepts
        self.index = None
        if os.path.isfile(os.path.join(self.model_dir, "index", "index.json")):
            from montrage.attribution.index import TrainIndex

            try:
                self.index = TrainIndex(os.path.join(self.model_dir, "index"), self.store)
            except ValueError as err:
                raise AttributionModelError(str(err)) from err
        self.shortlist = shortlist
        self._sm: StoreModel | None = None
        self._final_train: dict[str, np.ndarray] | None = None

    @classmethod
    def from_store(cls, store_path: str, **kw) -> "Attributor":
        return cls(store_path, **kw)

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
        self.store.close()

    @property
    def model(self) -> StoreModel:
        if self._sm is None:
            self._sm = StoreModel(self.store, self.model_path, self.device)
        return self._sm

    def load_images(self, images) -> torch.Tensor:
        """Paths or a (B, 3, H, W) tensor in [-1, 1] -> tensor at the run's resolution."""
        if isinstance(images, torch.Tensor):
            x = images.float()
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"query images must be (B, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}.")
            size = self.model.resolution
            if x.shape[-1] != size or x.shape[-2] != size:
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            return x
        if not images:
            raise ValueError("no query images given.")
        return torch.stack([load_image(str(p), self.model.resolution) for p in images])

    def image_scores(self, pixels: torch.Tensor, fast: bool = False, prompts: list[str] | None = None) -> np.ndarray:
        """(Q, N) influence scores of every training image on each query (generated from `prompts`, if known)."""
        seeds = [query_seed(p) for p in pixels]
        last = self.store.num_epochs - 1
        rows = [last] if fast else list(range(self.store.num_epochs))
        traj = self.model.trajectory(pixels, seeds, rows, prompts)
        return self.score_trajectories(traj, fast)[0]

    def score_trajectories(self, traj: dict[str, np.ndarray], fast: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, N), scored (Q, N) bool) of encoded queries {layer: (E or 1, Q, T, F)}. Small stores score every
        training image; indexed (large) ones each query's shortlist and the reference sample, exactly, and give the
        other images their concept's estimated mean."""
        with _one_blas_thread():
            return self._score_trajectories(traj, fast)

    def _score_trajectories(self, traj: dict[str, np.ndarray], fast: bool) -> tuple[np.ndarray, np.ndarray]:
        mode: Mode = "final" if fast else "trajectory"
        if fast and next(iter(traj.values())).shape[0] == 1:  # the final-epoch model reads only the last epoch
            traj = {k: np.repeat(v, self.store.num_epochs, axis=0) for k, v in traj.items()}
        if self.index is not None:
            from montrage.attribution.index import score_large

            return score_large(self.models[mode], self.index, traj, self.centre, mode, self.concept_ids, self.shortlist)
        scores = score_pairs(self.models[mode], self.store, traj, self.centre, mode)
        return scores, np.ones(scores.shape, bool)

    def concept_scores(self, scores: np.ndarray) -> np.ndarray:
        """(Q, C): mean image score per concept."""
        return np.stack([scores[:, self.labels == c].mean(axis=1) for c in self.concepts], axis=1)

    def query(self, images, top_k: int = 5, fast: bool = False, prompt: str | list[str] | None = None) -> list[dict]:
        """`prompt`: the text the images were generated from (one for all, or one per image), if known."""
        pixels = self.load_images(images)
        prompts = [prompt] * len(pixels) if isinstance(prompt, str) else prompt
        seeds = [query_seed(p) for p in pixels]
        rows = [self.store.num_epochs - 1] if fast else list(range(self.store.num_epochs))
        scores, scored = self.score_trajectories(self.model.trajectory(pixels, seeds, rows, prompts), fast)
        concept = self.concept_scores(scores)
        names = (
            [str(p) for p in images]
            if not isinstance(images, torch.Tensor)
            else [f"image{i}" for i in range(len(pixels))]
        )
        results = []
        for q in range(len(pixels)):
            order = np.argsort(-np.where(scored[q], scores[q], -np.inf))[:top_k]
            share = concept[q] / max(concept[q].sum(), 1e-12)
            result = {
                "image": names[q],
                "mode": "fast" if fast else "full",
                "concepts": {
                    c: {"score": round(float(concept[q, j]), 5), "share": round(float(share[j]), 5)}
                    for j, c in enumerate(self.concepts)
                },
                "top_concept": self.concepts[int(np.argmax(concept[q]))],
                "top_images": [
                    {
                        "id": self.train[i].id,
                        "path": self.train[i].path,
                        "concept": self.train[i].concept,
                        "score": round(float(scores[q, i]), 5),
                    }
                    for i in order
                ],
            }
            if prompts:
                result["prompt"] = prompts[q]
                result["prompt_concepts"] = [c for c in self.concepts if re.search(rf"\b{re.escape(c)}\b", prompts[q])]
            results.append(result)
        return results

    def plot(self, images, results: list[dict], path: str) -> str:
        """A PNG panel per query: the query, its top-K training images with scores, and the concept scores."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pixels = self.load_images(images)
        k = max(len(r["top_images"]) for r in results)
        fig, axes = plt.subplots(len(results), k + 2, figsize=(1.7 * (k + 2) + 1.5, 1.9 * len(results)), squeeze=False)
        by_id = {e.id: e for e in self.train}
        for row, (res, px) in enumerate(zip(results, pixels)):
            ax = axes[row]
            ax[0].imshow(((px.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1))
            ax[0].set_title("query", fontsize=9)
            for j, item in enumerate(res["top_images"]):
                img = read_example(by_id[item["id"]], self.model.resolution)
                ax[j + 1].imshow(((img.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1))
                ax[j + 1].set_title(f"{item['concept']}\n{item['score']:.3f}", fontsize=8)
            for a in ax[: k + 1]:
                a.axis("off")
            names = list(res["concepts"])
            ax[-1].barh(names, [res["concepts"][c]["share"] for c in names], color="tab:blue")
            ax[-1].set_title("concept share", fontsize=9)
            ax[-1].tick_params(labelsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
