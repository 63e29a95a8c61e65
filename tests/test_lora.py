import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from raybooth.errors import RayboothError
from raybooth.models.lora import (
    LORA_WEIGHTS,
    adapter_parameters,
    add_adapters,
    check_lora_dir,
    load_adapters,
    merge_lora,
    save_adapters,
)
from raybooth.models.tiny import build_tiny_pipeline

PROMPT = "a photo of sks toy car"
RANK, ALPHA = 4, 16.0  # alpha != rank: a loader that ignored the saved config would apply the LoRA at 1/4 strength


def image(pipeline, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipeline(PROMPT, num_inference_steps=2, generator=generator, output_type="np").images[0]


def unet_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 500]),
            torch.randn(2, 77, 32, generator=generator))


def adapted_pipeline(model_dir, lora_text_encoder):
    """The base pipeline with adapters whose B matrices are random, as after training ("gaussian"
    init leaves them zero, which would change nothing)."""
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir)
    add_adapters(pipeline.unet, pipeline.text_encoder, RANK, ALPHA, lora_text_encoder)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in [*pipeline.unet.named_parameters(), *pipeline.text_encoder.named_parameters()]:
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return pipeline


@pytest.fixture(scope="module")
def adapted(tiny_model_dir, tmp_path_factory):
    """An adapted pipeline (UNet and text encoder) and the folder its adapter was saved to."""
    pipeline = adapted_pipeline(tiny_model_dir, lora_text_encoder=True)
    folder = tmp_path_factory.mktemp("lora")
    save_adapters(pipeline.unet, pipeline.text_encoder, folder)
    return pipeline, folder


@pytest.fixture(scope="module")
def base_image(tiny_model_dir):
    return image(StableDiffusionPipeline.from_pretrained(tiny_model_dir))


def test_only_adapters_train_and_the_base_weights_stay_bit_equal():
    pipeline = build_tiny_pipeline()
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in
              (("unet", unet), ("text_encoder", text_encoder))}
    add_adapters(unet, text_encoder, RANK, ALPHA, lora_text_encoder=True)
    for module in (unet, text_encoder):
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable and trainable == {n for n, _ in module.named_parameters() if ".lora_" in n}
    parameters = adapter_parameters(unet) + adapter_parameters(text_encoder)
    adapters_before = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    ids = torch.randint(0, 200, (2, 77), generator=torch.Generator().manual_seed(0))
    sample, timesteps, _ = unet_inputs()
    for _ in range(3):
        prediction = unet(sample, timesteps, text_encoder(ids)[0]).sample
        F.mse_loss(prediction, torch.zeros_like(prediction)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        after = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if ".lora_" not in k}
        assert after.keys() == before[name].keys()
        assert all(torch.equal(after[k], before[name][k]) for k in after), f"{name} base weights changed"
    assert all(not torch.equal(a, b) for a, b in zip(adapters_before, parameters))  # A and B both moved


def test_adapters_are_fp32_on_a_half_precision_base():
    pipeline = build_tiny_pipeline()
    unet, text_encoder = pipeline.unet.to(torch.bfloat16), pipeline.text_encoder.to(torch.bfloat16)
    add_adapters(unet, text_encoder, RANK, ALPHA, lora_text_encoder=True)
    for module in (unet, text_encoder):
        assert {p.dtype for p in adapter_parameters(module)} == {torch.float32}
        assert {p.dtype for p in module.parameters() if not p.requires_grad} == {torch.bfloat16}
    sample, timesteps, hidden = unet_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unet(sample, timesteps, hidden).sample.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_parameters(unet))


def test_bad_rank_or_alpha_is_refused():
    pipeline = build_tiny_pipeline()
    with pytest.raises(RayboothError, match="rank"):
        add_adapters(pipeline.unet, pipeline.text_encoder, 0, ALPHA, False)
    with pytest.raises(RayboothError, match="alpha"):
        add_adapters(pipeline.unet, pipeline.text_encoder, RANK, 0.0, False)


def test_a_saved_unet_adapter_loads_in_diffusers_at_its_trained_scale(tiny_model_dir, base_image, tmp_path):
    trained = adapted_pipeline(tiny_model_dir, lora_text_encoder=False)
    weights = save_adapters(trained.unet, None, tmp_path)
    assert weights == tmp_path / LORA_WEIGHTS
    loaded = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    loaded.load_lora_weights(tmp_path)  # diffusers' own loader, unchanged
    config = next(iter(loaded.unet.peft_config.values()))
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(*unet_inputs()).sample, trained.unet(*unet_inputs()).sample)
    assert np.abs(image(loaded) - base_image).max() > 1e-3


def test_save_adapters_unwraps_ddp(tiny_model_dir, tmp_path):
    class Wrapped(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # DDP without a process group: only `.module` matters here
            torch.nn.Module.__init__(self)
            self.module = module

    trained = adapted_pipeline(tiny_model_dir, lora_text_encoder=True)
    weights = save_adapters(Wrapped(trained.unet), Wrapped(trained.text_encoder), tmp_path)
    assert check_lora_dir(tmp_path, tiny_model_dir) == weights


def test_a_saved_text_encoder_adapter_loads_in_diffusers(adapted, tiny_model_dir):
    trained, folder = adapted
    loaded = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    loaded.load_lora_weights(folder)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_encoder(ids)[0], trained.text_encoder(ids)[0])


def test_load_adapters_scale_0_is_the_base_model_and_1_the_trained_one(adapted, tiny_model_dir, base_image):
    trained, folder = adapted
    off = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    load_adapters(off, folder, scale=0.0)
    np.testing.assert_array_equal(image(off), base_image)
    on = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    load_adapters(on, folder, scale=1.0)
    assert not any(".lora_" in name for name, _ in on.unet.named_parameters())  # fused, adapter layers gone
    ids = on.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(on.text_encoder(ids)[0], trained.text_encoder(ids)[0])
        torch.testing.assert_close(on.unet(*unet_inputs()).sample, trained.unet(*unet_inputs()).sample)
    adapted_image = image(on)
    assert np.abs(adapted_image - base_image).max() > 1e-3
    np.testing.assert_allclose(adapted_image, image(trained), atol=1e-4)


def test_merge_lora_writes_a_plain_pipeline_that_draws_like_the_adapter(adapted, tiny_model_dir, tmp_path):
    trained, folder = adapted
    merged_dir = merge_lora(tiny_model_dir, folder, tmp_path / "merged")
    assert (merged_dir / "model_index.json").is_file()
    assert not list(merged_dir.rglob("*lora*"))
    merged = StableDiffusionPipeline.from_pretrained(merged_dir)
    assert not any("lora" in name for name in merged.unet.state_dict())
    np.testing.assert_allclose(image(merged), image(trained), atol=1e-4)
    with pytest.raises(RayboothError, match="already holds a model"):
        merge_lora(tiny_model_dir, folder, merged_dir)


def other_size_lora(folder, **unet_changes):
    """A LoRA trained on a tiny UNet of another size than the base."""
    pipeline = build_tiny_pipeline()
    config = {**pipeline.unet.config, **unet_changes}
    unet = UNet2DConditionModel.from_config(config)
    add_adapters(unet, pipeline.text_encoder, RANK, ALPHA, lora_text_encoder=False)
    save_adapters(unet, None, folder)
    return folder


def test_check_lora_dir_accepts_a_saved_adapter_and_its_file(adapted, tiny_model_dir):
    _, folder = adapted
    assert check_lora_dir(folder, tiny_model_dir) == folder / LORA_WEIGHTS
    assert check_lora_dir(folder / LORA_WEIGHTS, tiny_model_dir) == folder / LORA_WEIGHTS


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", f"has no {LORA_WEIGHTS}"),
    ("other file", "is not a LoRA folder"),
    ("garbage", "is not a readable safetensors file"),
    ("full unet", "holds no LoRA weights"),
    ("wider unet", "does not fit the base model"),
    ("other cross-attention width", "does not fit the base model"),
    ("unknown layer", "which the base model .* does not have"),
])
def test_check_lora_dir_refuses_what_would_not_load(case, message, tiny_model_dir, tmp_path):
    folder = tmp_path / "lora"
    if case != "missing":
        folder.mkdir()
    if case == "other file":
        folder = folder / "weights.safetensors"
        folder.write_bytes(b"")
    elif case == "garbage":
        (folder / LORA_WEIGHTS).write_bytes(b"this is not a safetensors file at all")
    elif case == "full unet":
        shutil.copy(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors", folder / LORA_WEIGHTS)
    elif case == "wider unet":
        other_size_lora(folder, block_out_channels=(64, 128))
    elif case == "other cross-attention width":
        other_size_lora(folder, cross_attention_dim=48)
    elif case == "unknown layer":
        save_file({"unet.nowhere.to_q.lora.down.weight": torch.zeros(RANK, 32),
                   "unet.nowhere.to_q.lora.up.weight": torch.zeros(32, RANK)}, folder / LORA_WEIGHTS)
    with pytest.raises(RayboothError, match=message) as error:
        check_lora_dir(folder, tiny_model_dir)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def test_load_adapters_refuses_a_lora_for_another_model_in_one_line(tiny_model_dir, tmp_path):
    other_size_lora(tmp_path, cross_attention_dim=48)
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    with pytest.raises(RayboothError, match=re.escape(str(tmp_path)) + ".*does not fit") as error:
        load_adapters(pipeline, tmp_path, scale=1.0)
    assert "\n" not in str(error.value)
