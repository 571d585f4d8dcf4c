"""backend="torch_xla" where torch_xla is not installed: a clear error that names it and how to install it."""

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed in this lane")


def test_missing_torch_xla_is_a_clear_error(tmp_path):
    torch = pytest.importorskip("torch")
    import xtrainer
    from xtrainer.backends import available_backends

    assert "torch_xla" not in available_backends()
    args = xtrainer.TrainingArguments(str(tmp_path), backend="torch_xla", report_to="none")
    with pytest.raises(ValueError, match=r"backend='torch_xla' needs torch_xla, which is not installed: pip install 'xtrainer\[xla\]'"):
        xtrainer.Trainer(model=torch.nn.Linear(2, 1), args=args)
