"""Shared fixtures. No network: tokenizers (and models, elsewhere) are built locally and saved to a temp dir,
then loaded through `from_pretrained` like users do."""
import pytest

from bayeskd.corpus import embedded_corpus, train_bpe_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer (vocab 512; <bos>, <eos>, <pad>, <unk>; a chat template) trained on the
    embedded corpus. Returns its directory."""
    return train_bpe_tokenizer(embedded_corpus(), vocab_size=512, out_dir=tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture
def rng(request):
    """A freshly seeded generator; the seed is printed so a failure can be replayed."""
    import numpy as np

    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"{request.node.name}: rng seed {seed}")
    return np.random.default_rng(seed)
