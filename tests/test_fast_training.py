"""The speed-ups change no result: the GEMM bottleneck computes what stock layers compute, and
precision flags that cannot work on this device are refused with one line."""

import pytest
import torch
import torch.nn as nn

import training
import vae
import VanVAE


def loss_and_grads(model, x):
    model.zero_grad()
    terms = model.loss(x, 1.0, torch.Generator().manual_seed(1))
    terms["loss"].backward()
    return terms["loss"].detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 20, 36)])
def test_gemm_bottleneck_gives_the_stock_layers_loss_and_gradients(shape):
    torch.manual_seed(0)
    model = vae.VanillaVAE(vae.VAEConfig("t", shape)).double()
    x = torch.rand(4, *shape, dtype=torch.double)
    fast_loss, fast_grads = loss_and_grads(model, x)
    for module in model.modules():  # the same weights, run by torch's own layers
        if isinstance(module, vae.Conv2d):
            module.__class__ = nn.Conv2d
        elif isinstance(module, vae.ConvTranspose2d):
            module.__class__ = nn.ConvTranspose2d
    stock_loss, stock_grads = loss_and_grads(model, x)
    assert torch.allclose(fast_loss, stock_loss, rtol=1e-12)
    for fast, stock in zip(fast_grads, stock_grads):
        assert torch.allclose(fast, stock, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kernel, height, width, bias", [(3, 28, 28, True), (5, 7, 9, False), (1, 4, 3, True)])
def test_one_output_channel_as_a_gemm_is_the_convolution(kernel, height, width, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 1, kernel, padding=kernel // 2, bias=bias)
    x = torch.randn(3, 6, height, width).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(x)
        got = vae.one_channel_as_gemm(x, conv.weight, conv.bias)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_decoder_takes_the_gemm_for_its_grey_output_and_decodes_as_the_stock_layers(monkeypatch):
    torch.manual_seed(0)
    model = vae.VanillaVAE(vae.VAEConfig("t", (1, 28, 28))).eval().to(memory_format=torch.channels_last)
    calls = []
    gemm = vae.one_channel_as_gemm
    monkeypatch.setattr(vae, "one_channel_as_gemm", lambda *a: calls.append(1) or gemm(*a))
    z = torch.randn(5, model.config.latent_dim)
    with torch.no_grad():
        fast = model.decode(z)
        assert calls, "the grey output layer did not take the GEMM"
        model.final_layer[1].__class__ = nn.Conv2d
        stock = model.decode(z)
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    calls.clear()
    model.final_layer[1].__class__ = vae.Conv2d
    model.decode(z).sum().backward()  # with gradients: the stock kernel, whose backward is faster
    assert not calls


def test_fp16_on_a_cpu_is_refused_in_one_line(capsys):
    assert VanVAE.main(["--train", "--precision", "fp16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fp16" in err and "CUDA" in err


def test_auto_precision_is_a_real_dtype():
    assert training.resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")
    assert training.resolve_precision("fp32", torch.device("cpu")) == "fp32"
