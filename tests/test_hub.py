import os
import subprocess
import sys

from helpers import HASH, as_hub_cache

from raybooth.models.hub import cache_model, pipeline_files

SD14_FILES = [
    ".gitattributes", "README.md", "model_index.json", "sd-v1-4.ckpt", "sd-v1-4-full-ema.ckpt",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin",
    "safety_checker/model.fp16.safetensors", "safety_checker/flax_model.msgpack",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.bin",
    "onnx/unet/model.onnx",
]


def test_pipeline_files_take_configs_and_one_copy_of_each_weight():
    chosen = set(pipeline_files(SD14_FILES))
    assert chosen == {
        "model_index.json", "feature_extractor/preprocessor_config.json",
        "safety_checker/config.json", "safety_checker/model.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.bin",  # no safetensors here: .bin it is
    }


def test_offline_a_snapshot_cached_earlier_is_used(tiny_model_dir, tmp_path, monkeypatch):
    snapshot = as_hub_cache(tiny_model_dir, tmp_path, name="raybooth/tiny-sd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert cache_model("raybooth/tiny-sd", HASH, tmp_path) == snapshot


def test_without_network_cache_model_fails_with_one_clear_line(tmp_path):
    # A closed local port: the hub's client cannot connect (after its own retries).
    env = os.environ | {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "raybooth", "cache-model", "--model_name", "CompVis/stable-diffusion-v1-4",
         "--revision", "249dd2d739844dea6a0bc7fc27b3c1d014720b28", "--model_dir", str(tmp_path / "m")],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("raybooth: error: cannot reach the Hugging Face Hub to download "
                               "CompVis/stable-diffusion-v1-4@249dd2d")
