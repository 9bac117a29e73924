import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray download fails fast
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning OpenMP threads when other jobs share the cores

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """An untrained tiny SD-layout model saved in diffusers format (no pre-training: tests never wait for learning)."""
    from montrage.recipes.tiny_base import TinyBaseConfig, build_components, save_pipeline

    path = str(tmp_path_factory.mktemp("tiny") / "model")
    save_pipeline(build_components(TinyBaseConfig()), path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    os.environ["MONTRAGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
