"""The speed-ups change no result: the GEMM bottleneck computes what stock layers compute, and
precision flags that cannot work on this device are refused with one line."""

import pytest
import torch
import torch.nn as nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

import kernels
import training
import vae
import VanVAE
from settings import RunChoices, TrainSettings


def loss_and_grads(model, x):
    model.zero_grad()
    terms = model.loss(x, 1.0, torch.Generator().manual_seed(1))
    terms["loss"].backward()
    return terms["loss"].detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def as_stock_layers(model):
    """The same weights, run by torch's own layers."""
    for module in model.modules():
        if isinstance(module, kernels.Conv2d):
            module.__class__ = nn.Conv2d
        elif isinstance(module, kernels.ConvTranspose2d):
            module.__class__ = nn.ConvTranspose2d


# Channels-last is how training runs (the bottleneck's taps in (h, w, c) order, the grey
# output's two-GEMM backward); contiguous is --no-channels_last.
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 20, 36)])
def test_gemm_bottleneck_gives_the_stock_layers_loss_and_gradients(shape, layout):
    torch.manual_seed(0)
    model = vae.VanillaVAE(vae.VAEConfig("t", shape)).double().to(memory_format=layout)
    x = torch.rand(4, *shape, dtype=torch.double).contiguous(memory_format=layout)
    fast_loss, fast_grads = loss_and_grads(model, x)
    as_stock_layers(model)
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
        got = kernels.one_channel_as_gemm(x, conv.weight, conv.bias)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_decoder_takes_the_gemm_for_its_grey_output_and_decodes_as_the_stock_layers(monkeypatch):
    torch.manual_seed(0)
    model = vae.VanillaVAE(vae.VAEConfig("t", (1, 28, 28))).eval().to(memory_format=torch.channels_last)
    calls = []
    gemm = kernels.one_channel_as_gemm
    monkeypatch.setattr(kernels, "one_channel_as_gemm", lambda *a: calls.append(1) or gemm(*a))
    z = torch.randn(5, model.config.latent_dim)
    with torch.no_grad():
        fast = model.decode(z)
        assert calls, "the grey output layer did not take the GEMM"
        model.final_layer[1].__class__ = nn.Conv2d
        stock = model.decode(z)
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    calls.clear()
    model.final_layer[1].__class__ = kernels.Conv2d
    out = model.decode(z)
    assert not calls  # with gradients: the stock forward, and a backward of two GEMMs
    assert type(out.grad_fn).__name__ == "OneChannelConvBackward"


def test_bf16_gradients_are_as_close_to_fp32_as_the_stock_layers_are():
    """Under autocast the rewritten layers hand bf16 to the GEMMs and fp32 gradients to Adam, as
    the stock layers do, and round no worse: bf16 gradients of an untrained network through
    BatchNorm differ from fp32 by up to 25% for both (measured), so each is held to the stock
    layers' own distance from fp32."""
    torch.manual_seed(0)
    model = vae.VanillaVAE(vae.VAEConfig("t", (1, 28, 28))).to(memory_format=torch.channels_last)
    x = torch.rand(32, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    _, fp32_grads = loss_and_grads(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_loss, fast_grads = loss_and_grads(model, x)
    as_stock_layers(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock_loss, stock_grads = loss_and_grads(model, x)
    torch.testing.assert_close(fast_loss, stock_loss, rtol=1e-3, atol=0)
    for (name, param), exact, fast, stock in zip(model.named_parameters(), fp32_grads, fast_grads, stock_grads):
        assert fast.dtype == param.dtype == torch.float32, name
        assert (fast - exact).norm() <= 1.25 * (stock - exact).norm() + 0.002 * exact.norm(), name


def test_fp16_on_a_cpu_is_refused_in_one_line(capsys):
    assert VanVAE.main(["--train", "--precision", "fp16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fp16" in err and "CUDA" in err


def test_auto_precision_is_a_real_dtype():
    assert training.resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")
    assert training.resolve_precision("fp32", torch.device("cpu")) == "fp32"


@pytest.mark.long
def test_compile_trains_the_same_steps_as_eager_and_caches_where_it_says(tmp_path, monkeypatch):
    """--compile compiles the whole training forward in place: the same losses and weights as
    eager to float precision, the same state_dict keys (so checkpoints load either way), and
    inductor's cache under ~/.cache (here XDG_CACHE_HOME), not /tmp."""
    # As inductor leaves it once any library has asked (modes.py's imports do): its /tmp default.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    images = torch.randint(0, 256, (16, 1, 12, 12), dtype=torch.uint8)
    runs = {}
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = vae.VanillaVAE(vae.VAEConfig("t", (1, 12, 12), latent_dim=4, hidden_dims=(4, 8)))
        keys = list(model.state_dict())
        step = training.TrainStep(model, TrainSettings(run=RunChoices(precision="fp32", compile=compile_)),
                                  torch.device("cpu"))
        losses = [step(images, torch.arange(8 * i, 8 * i + 8), 8, slice(None), 1e-2, 1.0)[2].item()
                  for i in range(2)]
        assert list(model.state_dict()) == keys
        runs[compile_] = losses, [p.detach().clone() for p in model.parameters()]
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    for compiled, eager in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)
    assert any((tmp_path / "vanvae" / "torchinductor").iterdir())


def test_bernoulli_nll_is_torchs_binary_cross_entropy_with_broadcast_and_extreme_logits():
    """The Bernoulli term, written out so it vectorises, gives torch's own values and gradients
    (float64), with the image broadcast against K decodings as the IW bound scores them, and
    logits far out where exp(-|l|) underflows."""
    torch.manual_seed(0)
    logits = (torch.randn(5, 3, 4, 6, dtype=torch.double) * 30).requires_grad_()
    logits.data[0, 0, 0, :3] = torch.tensor([-200.0, 200.0, 0.0], dtype=torch.double)
    x = torch.rand(3, 4, 6, dtype=torch.double).requires_grad_()
    ours = kernels.BernoulliNLL.apply(logits, x)
    stock = nn.functional.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    torch.testing.assert_close(ours, stock, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(ours.sum(), (logits, x)), torch.autograd.grad(stock.sum(), (logits, x))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    single = (torch.randn(4, 1, 28, 28) * 8).contiguous(memory_format=torch.channels_last)
    pixels = torch.rand(4, 1, 28, 28)
    per_image = vae.VanillaVAE(vae.VAEConfig("t", (1, 28, 28), recon_loss="bernoulli")).recon_nll(single, pixels)
    expected = nn.functional.binary_cross_entropy_with_logits(single.double(), pixels.double(), reduction="none")
    torch.testing.assert_close(per_image.double(), expected.sum((1, 2, 3)), rtol=1e-6, atol=0)  # fp32 sums of 784


def test_a_cache_folder_the_user_chose_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert training.inductor_cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert training.inductor_cache_dir() == str(tmp_path / "vanvae" / "torchinductor")
