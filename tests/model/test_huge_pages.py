"""Weights move into memory advised MADV_HUGEPAGE, unchanged, once each, tied ones together."""
import mmap
import sys

import pytest
import torch
from torch import nn

from sloserve import LLM
from sloserve.model import huge_pages
from sloserve.model.huge_pages import move_weights_to_huge_pages

linux_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"),
                               reason="MADV_HUGEPAGE is Linux's")


def vm_flags(address: int) -> set[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps); 'hg' = MADV_HUGEPAGE."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.proj = nn.Linear(24, 30)
        self.head = nn.Linear(24, 50, bias=False)
        self.head.weight = self.embed.weight


@linux_thp
def test_matrices_move_unchanged_tied_ones_together():
    model = Tied().to(torch.bfloat16)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    bias_ptr = model.proj.bias.data_ptr()
    assert move_weights_to_huge_pages(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert model.head.weight is model.embed.weight  # still one tied parameter, moved once
    for p in (model.embed.weight, model.proj.weight):
        assert p.data_ptr() % huge_pages.ALIGN == 0 and p.is_contiguous()
        assert "hg" in vm_flags(p.data_ptr())
    assert model.proj.bias.data_ptr() == bias_ptr  # vectors stay: only matrices are streamed
    assert model.embed.weight.untyped_storage().data_ptr() == model.proj.weight.untyped_storage().data_ptr()


def test_weights_stay_where_huge_pages_are_refused(monkeypatch):
    monkeypatch.setattr(huge_pages, "huge_page_buffer", lambda nbytes: None)
    model = Tied()
    ptr = model.proj.weight.data_ptr()
    assert not move_weights_to_huge_pages(model)
    assert model.proj.weight.data_ptr() == ptr


@linux_thp
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_loaded_model_streams_from_huge_pages(tiny_model_dir, quantization):
    llm = LLM(str(tiny_model_dir("llama")), dtype="bfloat16", quantization=quantization)
    model = llm.engine.executor.model
    for p in (model.lm_head.weight, model.layers[0].qkv_proj.weight, model.layers[-1].down_proj.weight):
        assert "hg" in vm_flags(p.data_ptr())
