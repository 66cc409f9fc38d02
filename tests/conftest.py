"""Shared fixtures. No network: tokenizers (and models, elsewhere) are built locally and saved to a temp dir,
then loaded through `from_pretrained` like users do."""
import os

# Triton kernels run in the interpreter on CPU; set before any test module imports triton (a module that
# imported the kernels compiled would leave later ones calling @triton.jit helpers outside the interpreter).
# BAYESKD_KERNELS_COMPILED=1 keeps the compiled kernels (the tests run on a GPU).
if os.environ.get("BAYESKD_KERNELS_COMPILED") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (`-n N`, the README's test command) N workers share the cores: each worker's torch, and the jobs
# its tests start in subprocesses, take their share of the threads rather than all of them (oversubscribed OpenMP
# threads spin and wait on each other). Set before torch is imported; an OMP_NUM_THREADS of the caller's wins.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402

from bayeskd.corpus import embedded_corpus, train_bpe_tokenizer  # noqa: E402


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
    """A generator seeded from the test's id (fixed: every run draws the same inputs; sha256, not hash(), which
    changes per process). BAYESKD_TEST_SEED=N draws other inputs; the seed is printed either way."""
    import hashlib
    import os

    import numpy as np

    seed = int(os.environ.get("BAYESKD_TEST_SEED")
               or int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:4], "little"))
    print(f"{request.node.name}: rng seed {seed}")
    return np.random.default_rng(seed)


def is_utf8(b: bytes) -> bool:
    """Whether the bytes are whole UTF-8 characters (a token's bytes may hold part of one)."""
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def save_tiny_llama(path, tokenizer, seed: int, layers: int = 1) -> str:
    """A tiny Llama over `tokenizer`'s vocabulary, saved with its tokenizer like a user's checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def pytest_configure(config):
    # Drills run jobs in subprocesses and kill them; CI runs them in a small configuration (tests/test_drill.py).
    config.addinivalue_line("markers", "drill: kills, corrupts or starves a real job and checks nothing is lost")
    # The README's test command leaves the long end-to-end tests out (-m "not e2e"); CI runs them after it (.ci/run).
    config.addinivalue_line("markers", "e2e: a long end-to-end test (the drill, a lab run, DDP under torchrun, a job "
                                       "on a full disk): `-m e2e` and CI run them; the README's command does not")
