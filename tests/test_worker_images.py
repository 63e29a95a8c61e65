"""The VAE's decoder parked in host memory while a GPU worker trains. No GPU here: the modules are
stand-ins that record where they are moved (a real run: bench/targets.py's flow on a GPU, whose
`raybooth run` samples after training with the decoder parked)."""

from types import SimpleNamespace

import pytest
import torch

from raybooth.generate.on_worker import decoder_on_device, park_vae_decoder


class Part:
    """A module's stand-in: where its parameters are, and each move asked of it."""

    def __init__(self, device: str):
        self.device, self.moves = torch.device(device), []

    def parameters(self):
        return iter([SimpleNamespace(device=self.device)])

    def to(self, device):
        self.device = torch.device(device)
        self.moves.append(self.device.type)
        return self


def models_on(device: str, decoder: str):
    vae = SimpleNamespace(decoder=Part(decoder), post_quant_conv=Part(decoder), device=torch.device(device))
    return SimpleNamespace(vae=vae, device=torch.device(device))


def test_a_gpu_workers_decoder_goes_to_host_memory():
    models = models_on("cuda", decoder="cuda")
    park_vae_decoder(models)
    assert models.vae.decoder.moves == ["cpu"] and models.vae.post_quant_conv.moves == ["cpu"]


def test_a_cpu_workers_decoder_stays():
    models = models_on("cpu", decoder="cpu")
    park_vae_decoder(models)
    assert models.vae.decoder.moves == [] and models.vae.post_quant_conv.moves == []


def test_a_parked_decoder_comes_back_for_the_images_and_leaves_again_even_on_an_error():
    models = models_on("cuda", decoder="cpu")
    with pytest.raises(RuntimeError, match="render failed"):
        with decoder_on_device(models):
            assert models.vae.decoder.device.type == "cuda" and models.vae.post_quant_conv.device.type == "cuda"
            raise RuntimeError("render failed")
    assert models.vae.decoder.moves == ["cuda", "cpu"] and models.vae.post_quant_conv.moves == ["cuda", "cpu"]


def test_a_decoder_never_parked_is_left_where_it_is():
    models = models_on("cuda", decoder="cuda")
    with decoder_on_device(models):
        pass
    assert models.vae.decoder.moves == []
