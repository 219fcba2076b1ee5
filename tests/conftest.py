import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device: skipped without one (the GPU readiness script runs them on a lent GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """fp32 comparisons that must agree to 1e-5 or exactly: with 2 threads the kernels split their
    reductions differently for different shapes (decoder logits 2-4e-5 apart on an AMD EPYC host, identical
    with 1 thread), so these tests compare in one thread, where the order of the sums is the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer with the release's special tokens, trained in seconds on task text."""
    from diffusiongemma.training import tasks
    from diffusiongemma.training.recipe import Recipe, tokenizer_texts
    from diffusiongemma.training.tokenizer import save_tokenizer, train_tokenizer

    passages = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
                "Naïve café déjà vu — emoji 🎉🚀 and CJK 日本語の文章 and accents àéîõü."] * 50
    texts = tokenizer_texts(Recipe(tokenizer_samples=60), passages)
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(texts, 800), path)
    assert tasks.FAMILIES
    return path


@pytest.fixture(scope="session")
def tiny_text_model_dir(small_tokenizer_dir, tmp_path_factory):
    """A random tiny checkpoint with that tokenizer and the chat template: a complete model directory."""
    import shutil

    from diffusiongemma.config import GenerationConfig, ModelConfig, TextConfig
    from diffusiongemma.loader import save
    from diffusiongemma.loader.random_weights import random_model, size_config
    from diffusiongemma.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(small_tokenizer_dir)
    base = size_config("tiny")
    text = TextConfig.from_dict({**base.text.to_dict(), "vocab_size": tok.vocab_size})
    config = ModelConfig(text=text, canvas_length=16, eos_token_id=(1, 106, 50))
    path = tmp_path_factory.mktemp("tm") / "model"
    save(random_model(config, torch.float32), config, GenerationConfig(eos_token_id=(1, 106, 50)), path)
    for f in small_tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "diffusiongemma-tiny"


@pytest.fixture(scope="session")
def shipped_model_dir():
    """The model shipped in the repository (committed; the tests rely on it)."""
    assert (SHIPPED / "model.safetensors").is_file(), f"the shipped model is missing at {SHIPPED}"
    return SHIPPED


@pytest.fixture(scope="session")
def shipped_or_tiny_model_dir(tiny_text_model_dir):
    return SHIPPED if (SHIPPED / "model.safetensors").is_file() else tiny_text_model_dir


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """A damped random reference model with peaked outputs (see hf_utils.make_hf_model), canvas 16, stop ids
    1, 2, 3, saved and loaded: (the transformers model, our checkpoint)."""
    import diffusiongemma as dg
    from hf_utils import make_hf_model, save_hf

    hf = make_hf_model(0, logit_gain=8.0, sc_gain=0.1)
    path = save_hf(hf, tmp_path_factory.mktemp("pair") / "m", generation={"eos_token_id": [1, 2, 3]})
    return hf, dg.load(path)
