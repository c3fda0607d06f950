"""megalite.ops.backend: MEGALITE_KERNELS=reference really runs the reference; a missing extension
falls back to the reference with one warning."""
import warnings

import pytest
import torch

import megalite.ops.norms as norms
import megalite.optim.adam as adam
from megalite.ops import backend, backend_name, layer_norm, rms_norm


def test_reference_is_forced_by_environment(monkeypatch):
    calls = []
    real_layer_norm, real_rms_norm = norms.reference.layer_norm, norms.reference.rms_norm
    monkeypatch.setattr(norms.reference, "layer_norm", lambda *a: calls.append("ln") or real_layer_norm(*a))
    monkeypatch.setattr(norms.reference, "rms_norm", lambda *a: calls.append("rms") or real_rms_norm(*a))
    monkeypatch.setattr(adam, "adam_step_reference", lambda *a, **k: calls.append("adam"))
    x = torch.randn(3, 8, requires_grad=True)
    tensors = [torch.zeros(4) for _ in range(4)]
    hyper = dict(step=1, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)

    monkeypatch.setenv("MEGALITE_KERNELS", "reference")
    assert backend_name("cpu") == "reference"
    layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5)
    rms_norm(x, torch.ones(8), 1e-5)
    adam.adam_step(*[[t] for t in tensors], **hyper)
    assert calls == ["ln", "rms", "adam"]

    if not backend.native_available(torch.device("cpu")):
        pytest.skip("megalite._C is not built: the default is the reference too")
    monkeypatch.delenv("MEGALITE_KERNELS")
    assert backend_name("cpu") == "cpu"
    y = layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5)
    rms_norm(x, torch.ones(8), 1e-5)
    adam.adam_step(*[[t] for t in tensors], **hyper)
    assert calls == ["ln", "rms", "adam"]          # nothing more reached the reference
    assert "LayerNormFunction" in type(y.grad_fn).__name__


def test_unknown_choice_is_refused(monkeypatch):
    monkeypatch.setenv("MEGALITE_KERNELS", "fastest")
    with pytest.raises(ValueError, match="MEGALITE_KERNELS='fastest' is not one of"):
        backend_name("cpu")


def test_missing_extension_warns_once_and_uses_reference(monkeypatch):
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    monkeypatch.setattr(backend, "_loaded", {"megalite._C": False})
    monkeypatch.setattr(backend, "_load_errors", {"megalite._C": "simulated build failure"})
    monkeypatch.setattr(backend, "_warned", set())
    x = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = layer_norm(x, torch.ones(4), torch.zeros(4), 1e-5)
        layer_norm(x, torch.ones(4), torch.zeros(4), 1e-5)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated build failure" in messages[0] and "reference" in messages[0]
    torch.testing.assert_close(first, torch.nn.functional.layer_norm(x, (4,), torch.ones(4), torch.zeros(4)))
