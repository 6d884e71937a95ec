import torch

from ira.hardware import detect_hardware, pick_preset, resolve_device


def test_detects_this_machine():
    info = detect_hardware()
    assert info.device in ("cpu", "cuda", "mps")
    assert info.system_memory_gb > 0
    if info.device != "cuda":
        assert not info.four_bit and info.four_bit_reason
    assert info.preset in ("cpu", "laptop", "a100")
    assert info.device.upper() in info.summary()


def test_preset_choice():
    assert pick_preset("cuda", 80.0, 64) == "a100"
    assert pick_preset("cuda", 16.0, 32) == "laptop"
    assert pick_preset("cuda", 4.0, 16) == "cpu"
    assert pick_preset("mps", None, 32) == "laptop"
    assert pick_preset("mps", None, 8) == "cpu"
    assert pick_preset("cpu", None, 128) == "cpu"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        try:
            resolve_device("cuda")
        except RuntimeError as exc:
            assert "CUDA is not available" in str(exc)
        else:
            raise AssertionError("cuda accepted on a machine without CUDA")
