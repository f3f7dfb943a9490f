"""CUDA checks (skipped without a GPU): the optimised bf16 decoding paths give the plain path's tokens.

- The CUDA-graph cached steps (prefilling, the dual cache's windows) give exactly the tokens of the
  uncaptured steps (same kernels), compiled with torch.compile or not.
- bf16 CUDA decoding of the shipped tiny model gives the answers of CPU fp32 decoding.
"""

import pathlib

import pytest
import torch

from dimple.modeling_dimple import DimpleModel
from dimple_tools.tiny.configs import BOS_ID, IMAGE_ID, VISION_END_ID, VISION_START_ID, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    # A failed capture only warns and decodes uncaptured: here it must fail, or graph vs plain compares plain twice.
    pytest.mark.filterwarnings("error:CUDA graph capture failed"),
]


def image_prompt(device):
    ids = torch.tensor([[BOS_ID, 10, 11, VISION_START_ID] + [IMAGE_ID] * 4 + [VISION_END_ID, 12, 13]], device=device)
    torch.manual_seed(0)
    pixels = torch.randn(16, 1176, device=device)
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 4, 4]], device=device)}


CACHES = [
    dict(use_cache=True),
    dict(block_length=4, dual_cache=True),  # window passes captured; refreshes are full passes
    dict(block_length=4, dual_cache=True, use_cache=True),  # window and tail passes captured
]


@pytest.mark.parametrize("cache", CACHES, ids=lambda c: "-".join(sorted(c)))
@pytest.mark.parametrize("alg", ["maskgit_plus", "autoregressive", "entropy"])
@pytest.mark.parametrize("threshold", [None, 0.05])
def test_cuda_graph_step_gives_the_uncaptured_tokens(alg, threshold, cache):
    torch.manual_seed(0)
    model = DimpleModel(tiny_config(initializer_range=0.2)).eval().cuda().to(torch.bfloat16)
    inputs = image_prompt("cuda")
    kwargs = dict(max_new_tokens=12, steps=12, alg=alg, alg_p_threshold=threshold, return_dict_in_generate=True,
                  **cache)
    graphed = model.diffusion_generate(**inputs, use_cuda_graph=True, **kwargs)
    plain = model.diffusion_generate(**inputs, use_cuda_graph=False, **kwargs)
    assert torch.equal(graphed.sequences, plain.sequences)
    assert graphed.num_forward_passes == plain.num_forward_passes


@pytest.mark.parametrize("cache", CACHES[::2], ids=lambda c: "-".join(sorted(c)))
def test_compiled_steps_in_a_cuda_graph(cache):
    # torch.compile's kernels captured in our CUDA graph replay exactly what they compute uncaptured; against
    # eager bf16 the fused kernels round differently, so the tokens are compared, not required equal.
    torch.manual_seed(0)
    model = DimpleModel(tiny_config(initializer_range=0.2)).eval().cuda().to(torch.bfloat16)
    inputs = image_prompt("cuda")
    kwargs = dict(max_new_tokens=12, steps=12, alg="maskgit_plus", return_dict_in_generate=True, **cache)
    graphed = model.diffusion_generate(**inputs, use_torch_compile=True, use_cuda_graph=True, **kwargs)
    plain = model.diffusion_generate(**inputs, use_torch_compile=True, use_cuda_graph=False, **kwargs)
    eager = model.diffusion_generate(**inputs, use_torch_compile=False, use_cuda_graph=False, **kwargs)
    assert torch.equal(graphed.sequences, plain.sequences)
    agree = (plain.sequences == eager.sequences).float().mean().item()
    assert agree >= 0.9, f"compiled vs eager bf16: {agree:.0%} of tokens agree"


@pytest.mark.parametrize("settings", [dict(use_cache=True), dict(use_cache=True, block_length=4, dual_cache=True)],
                         ids=["prefilling", "dual-cache"])
def test_bf16_cuda_answers_match_cpu_fp32_on_the_tiny_model(settings):
    folder = ROOT / "tiny-dimple"
    if not (folder / "model.safetensors").exists():
        pytest.skip("tiny-dimple/ is not built")
    from dimple_tools.tiny.build import IMAGE_SIZE, ask
    from dimple_tools.tiny.task import generate_samples
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    cpu = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    gpu = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).cuda().eval()

    class OnDevice:  # the processor's tensors moved to the model's device and dtype
        def __init__(self, model):
            self.model = model

        def diffusion_generate(self, **inputs):
            inputs = {k: v.to(self.model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            return self.model.diffusion_generate(**inputs)

    same = 0
    samples = generate_samples(30, seed=7, image_size=IMAGE_SIZE)
    for image, question, _, _ in samples:
        cpu_answer, _ = ask(cpu, processor, image, question, **settings)
        gpu_answer, _ = ask(OnDevice(gpu), processor, image, question, **settings)
        same += cpu_answer == gpu_answer
    assert same >= 29, f"bf16 CUDA agreed with CPU fp32 on {same}/30 answers"


def test_rms_norm_of_bf16_input_is_the_normalisation_of_its_fp32_copy():
    # DimpleRMSNorm hands bf16 activations to F.rms_norm, which normalises in fp32 and rounds once; the fp32 copy
    # (what Qwen2RMSNorm normalises) goes through the same fused CUDA kernel. Only the order of the fp32
    # reduction may differ between the two dtypes' kernels: at most one bf16 rounding step apart, rarely.
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = (5 * torch.randn(512, 3584, device="cuda")).to(torch.bfloat16)
    direct = F.rms_norm(x, (3584,), eps=1e-6)
    via_fp32 = F.rms_norm(x.float(), (3584,), eps=1e-6).to(torch.bfloat16)
    assert direct.dtype == torch.bfloat16
    ulp = via_fp32.float().abs() * 2.0**-7
    assert ((direct.float() - via_fp32.float()).abs() <= ulp).all()
    assert (direct == via_fp32).float().mean().item() >= 0.999
