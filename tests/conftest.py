"""Shared fixtures."""

import pytest
import torch

from grouplora.ml.model import load_base_model


@pytest.fixture(scope="module")
def one_thread():
    # A 64-wide model is dominated by thread hand-off on a shared 2-core box: one thread is faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    """The tiny random Llama and its in-memory tokenizer (no download)."""
    return load_base_model("tiny")
