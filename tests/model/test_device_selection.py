"""Where the model runs and how much KV cache it gets: device, attention backend and KV sizing choices."""
import pytest
import torch

from sloserve.config import EngineConfig
from sloserve.model.attention import select_backend
from sloserve.model.attention.cpu import CpuAttention
from sloserve.model.kv_memory import CPU_DEFAULT_KV_BYTES, kv_block_bytes, kv_cache_blocks
from sloserve.model.ops import TorchOps

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


@NO_GPU
def test_auto_device_is_the_cpu_without_a_gpu():
    assert EngineConfig(model="m").device == "cpu"


@NO_GPU
def test_asking_for_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        EngineConfig(model="m", device="cuda")


@pytest.mark.parametrize("knobs, message", [
    (dict(device="tpu"), "unknown device"),
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(kv_cache_memory_bytes=0), "kv_cache_memory_bytes"),
])
def test_bad_device_knobs_are_refused(knobs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **knobs)


def test_attention_backend_follows_the_device():
    assert isinstance(select_backend("auto", torch.device("cpu"), 16, TorchOps()), CpuAttention)
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_backend("flash", torch.device("cpu"), 16, TorchOps())


def test_kv_blocks_from_count_budget_or_cpu_default(tiny_model_dir):
    from sloserve import LLM

    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", device="cpu")
    model = llm.engine.executor.model
    per_block = kv_block_bytes(model, EngineConfig(model="m"), torch.float32)
    # 2 layers x (key + value) x 16 slots x 2 KV heads x head_dim 16 x 4 bytes
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4
    assert llm.engine.executor.num_kv_blocks == CPU_DEFAULT_KV_BYTES // per_block
    assert kv_cache_blocks(model, EngineConfig(model="m", num_kv_blocks=7, kv_cache_memory_bytes=1 << 20), torch.float32) == 7
    assert kv_cache_blocks(model, EngineConfig(model="m", kv_cache_memory_bytes=10 * per_block + 1), torch.float32) == 10
