"""Data modules: concept image folders, the built-in digits concept set, and DreamBooth instance/class data."""

from __future__ import annotations

import functools
import os
from typing import Optional

import pytorch_lightning as pl
import torch

from montrage.data import (
    IMAGE_SUFFIXES,
    ConceptImageDataset,
    DataError,
    TrainExample,
    digit_token,
    digits_examples,
    scan_concept_folder,
)


def collate(batch: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "is_prior": torch.tensor([b.get("is_prior", False) for b in batch], dtype=torch.bool),
    }


class ConceptDataModule(pl.LightningDataModule):
    """Training images of several concepts: `data_dir/<concept>/*.png`, or digits when `data_dir` is None.

    Captions come from `caption_template` with the concept's token (`{token}`), or from a sidecar .txt per image.
    With digits, concept k is `digit<k>` and its token is the digit's English word (e.g. "seven").
    """

    def __init__(
        self,
        data_dir: Optional[str] = None,
        digits: list[int] = [1, 4, 7, 9],
        images_per_concept: int = 16,
        caption_template: str = "a photo of {token}",
        resolution: int = 16,
        batch_size: int = 16,
        repeats: int = 1,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.dataset: Optional[ConceptImageDataset] = None

    def examples(self) -> list[TrainExample]:
        hp = self.hparams
        if hp.data_dir is not None:
            return scan_concept_folder(hp.data_dir, hp.caption_template)
        return digits_examples(list(hp.digits), hp.images_per_concept, hp.caption_template)

    def concept_tokens(self) -> dict[str, str]:
        """Concept name -> the token its captions use (for building probe prompts)."""
        if self.hparams.data_dir is not None:
            return {c: c for c in sorted({e.concept for e in self.examples()})}
        return {f"digit{d}": digit_token(d) for d in self.hparams.digits}

    def setup(self, stage: str = "fit") -> None:
        if self.dataset is None:
            self.dataset = ConceptImageDataset(self.examples(), self.hparams.resolution, self.hparams.repeats)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.hparams.seed)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
            generator=g,
            drop_last=False,
        )


class PriorDataset(torch.utils.data.Dataset):
    """Instance examples paired with class (prior-preservation) images, as the diffusers DreamBooth script does."""

    def __init__(self, instance: ConceptImageDataset, class_pixels: Optional[torch.Tensor], class_prompt: str):
        self.instance, self.class_pixels, self.class_prompt = instance, class_pixels, class_prompt
        self.examples = instance.examples
        self.pixels = instance.pixels

    def __len__(self):
        return len(self.instance)

    def __getitem__(self, i):
        item = dict(self.instance[i])
        if self.class_pixels is not None:
            item["class_pixel_values"] = self.class_pixels[i % len(self.class_pixels)]
        return item


def collate_prior(batch: list[dict], class_prompt: str) -> dict:
    """Instance rows first, then class rows; `is_prior` marks which (the loss splits on it)."""
    out = collate(batch)
    if "class_pixel_values" in batch[0]:
        out["pixel_values"] = torch.cat([out["pixel_values"], torch.stack([b["class_pixel_values"] for b in batch])])
        out["caption"] = out["caption"] + [class_prompt] * len(batch)
        out["is_prior"] = torch.cat([out["is_prior"], torch.ones(len(batch), dtype=torch.bool)])
    return out


class DreamBoothDataModule(pl.LightningDataModule):
    """Instance images of one subject with an identifier-token prompt, plus optional class images for prior preservation.

    Missing class images (fewer than `num_class_images` in `class_data_dir`) are generated with the base model
    before training, on global rank 0.
    """

    def __init__(
        self,
        instance_data_dir: Optional[str] = None,
        instance_prompt: str = "a photo of sks digit",
        instance_digit: int = 7,
        instance_images: int = 8,
        with_prior_preservation: bool = False,
        class_data_dir: Optional[str] = None,
        class_prompt: str = "a photo of a digit",
        num_class_images: int = 16,
        resolution: int = 16,
        batch_size: int = 4,
        repeats: int = 1,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.dataset = None

    def examples(self) -> list[TrainExample]:
        hp = self.hparams
        if hp.instance_data_dir is None:
            ex = digits_examples([hp.instance_digit], hp.instance_images)
            return [TrainExample(e.id, "instance", hp.instance_prompt, e.path) for e in ex]
        if not os.path.isdir(hp.instance_data_dir):
            raise DataError(f"instance_data_dir {hp.instance_data_dir!r} does not exist.")
        files = sorted(f for f in os.listdir(hp.instance_data_dir) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise DataError(f"instance_data_dir {hp.instance_data_dir!r} holds no images.")
        return [
            TrainExample(f"instance/{f}", "instance", hp.instance_prompt, os.path.join(hp.instance_data_dir, f))
            for f in files
        ]

    def concept_tokens(self) -> dict[str, str]:
        return {"instance": self.hparams.instance_prompt}

    def _class_images(self) -> Optional[torch.Tensor]:
        hp = self.hparams
        if not hp.with_prior_preservation:
            return None
        if hp.class_data_dir is None:
            raise DataError("with_prior_preservation needs `class_data_dir` (a folder for the class images).")
        os.makedirs(hp.class_data_dir, exist_ok=True)
        have = sorted(f for f in os.listdir(hp.class_data_dir) if f.endswith(".png"))
        trainer = getattr(self, "trainer", None)
        missing = hp.num_class_images - len(have)
        if missing > 0 and (trainer is None or trainer.is_global_zero):
            module = trainer.lightning_module if trainer is not None else None
            if module is None or not hasattr(module, "generate"):
                raise DataError("class images are missing and no model is attached to generate them.")
            if trainer is not None:
                module.to(trainer.strategy.root_device)  # setup runs before the strategy moves the model
            images = module.generate([hp.class_prompt] * missing, seeds=list(range(len(have), hp.num_class_images)))
            from PIL import Image

            for k, img in enumerate(images):
                arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
                Image.fromarray(arr).save(os.path.join(hp.class_data_dir, f"class_{len(have) + k:05d}.png"))
        if trainer is not None:
            trainer.strategy.barrier("montrage-class-images")
        from montrage.data import load_image

        files = sorted(f for f in os.listdir(hp.class_data_dir) if f.endswith(".png"))[: hp.num_class_images]
        return torch.stack([load_image(os.path.join(hp.class_data_dir, f), hp.resolution) for f in files])

    def setup(self, stage: str = "fit") -> None:
        if self.dataset is None:
            instance = ConceptImageDataset(self.examples(), self.hparams.resolution, self.hparams.repeats)
            self.dataset = PriorDataset(instance, self._class_images(), self.hparams.class_prompt)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.hparams.seed)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            generator=g,
            collate_fn=functools.partial(collate_prior, class_prompt=self.hparams.class_prompt),
            num_workers=self.hparams.num_workers,
        )
