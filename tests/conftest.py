"""Shared fixtures: reference implementations and the real Llama 3 tokenizer, never a download."""

import os
import pathlib
import tempfile

# Tests that shard use 8 fake CPU devices; this must be set before jax is first imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared with the subprocesses tests start: the
# same programs (a tiny model's train step, prefill, decode) then compile once, not once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="llama_jax_test_xla_"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> pathlib.Path:
    """The real Llama 3 `tokenizer.model` (128,000 BPE ranks) shipped by Meta's llama-models package."""
    import llama_models

    path = pathlib.Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def tokenizer(llama3_tokenizer_path):
    """The real Llama 3 tokenizer (ours), loaded once."""
    from llama_jax.text.tokenizer import Tokenizer

    return Tokenizer.from_file(llama3_tokenizer_path)


@pytest.fixture(scope="session")
def chat(tokenizer):
    """Our `ChatFormat` over the real Llama 3 tokenizer."""
    from llama_jax.text.chat import ChatFormat

    return ChatFormat(tokenizer)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's in-memory caches after each test file.

    Every XLA:CPU executable keeps its code in mappings of its own, and JAX's caches keep the
    executables alive: one pytest process over the whole suite grew past Linux's default
    `vm.max_map_count` (65,530 mappings) and segfaulted inside the compiler, about 850 tests in.
    Clearing the caches after each file unmaps them (one file's ~5,000 mappings go back to ~800);
    the on-disk compilation cache keeps the programs files share.
    """
    yield
    import gc

    jax.clear_caches()
    gc.collect()
