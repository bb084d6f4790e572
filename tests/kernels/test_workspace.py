"""The kernels' scratch buffers: reuse, growth, isolation, and when they may be used."""

import threading

import torch

from rlcpm.kernels.workspace import Workspace, can_use_scratch


def test_same_name_reuses_storage_and_grows_on_demand():
    ws = Workspace()
    a = ws.get("keys", (4, 8), torch.float32, "cpu")
    b = ws.get("keys", (2, 8), torch.float32, "cpu")
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 8)
    c = ws.get("keys", (16, 8), torch.float32, "cpu")
    assert c.shape == (16, 8) and c.is_contiguous()
    assert ws.nbytes() == 16 * 8 * 4


def test_names_and_dtypes_get_separate_buffers():
    ws = Workspace()
    a = ws.get("keys", (4,), torch.float32, "cpu")
    b = ws.get("values", (4,), torch.float32, "cpu")
    c = ws.get("keys", (4,), torch.bfloat16, "cpu")
    assert len({a.data_ptr(), b.data_ptr(), c.data_ptr()}) == 3 and c.dtype == torch.bfloat16
    ws.clear()
    assert ws.nbytes() == 0


def test_buffers_are_per_thread():
    ws = Workspace()
    main = ws.get("keys", (64,), torch.float32, "cpu").data_ptr()
    other = []
    thread = threading.Thread(
        target=lambda: other.append(ws.get("keys", (64,), torch.float32, "cpu").data_ptr())
    )
    thread.start()
    thread.join()
    assert other[0] != main


def test_inference_mode_buffers_are_kept_apart():
    ws = Workspace()
    with torch.inference_mode():
        inside = ws.get("keys", (8,), torch.float32, "cpu")
    outside = ws.get("keys", (8,), torch.float32, "cpu")
    assert outside.data_ptr() != inside.data_ptr()
    outside.add_(1.0)  # a normal tensor: in-place work outside inference mode is allowed


def test_scratch_only_when_autograd_does_not_track():
    leaf = torch.zeros(3, requires_grad=True)
    plain = torch.zeros(3)
    assert can_use_scratch(plain)
    assert not can_use_scratch(plain, leaf)
    with torch.no_grad():
        assert can_use_scratch(plain, leaf)
    assert not can_use_scratch(plain.to("meta"))
