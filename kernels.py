"""Exact CPU rewrites of the layers where the stock kernels are slow: the same weights, the same
state_dict and the same sums in another order, measured in bench.py and checked against the
stock layers in tests/test_fast_training.py. vae.py builds its network from these, so it reads as
the model and its mathematics alone."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same weights, same state_dict) with exact rewrites where oneDNN's kernel is
    slow, each the same sum in another order:
    - a one-pixel output as one matrix product over the kernel taps that land on the input: at
      the bottleneck (a 2x2 input, stride 2, padding 1) 5 of the 9 taps only ever see zero
      padding, and a GEMM beats the conv kernel there (see LiveTaps);
    - the final layer's single output channel (grey images) on a CPU in channels-last: without
      gradients in fp32, as the IW bound's decoding copy and a training run's test pass and
      sample grids run it, see one_channel_as_gemm; with gradients, in training, the stock
      forward and a backward of two GEMMs, see OneChannelConv."""

    def forward(self, x):
        h, w = x.shape[-2:]
        (ph, pw), (kh, kw), (sh, sw) = self.padding, self.kernel_size, self.stride
        plain = self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
        one_pixel = (h + 2 * ph - kh) // sh == 0 and (w + 2 * pw - kw) // sw == 0
        if plain and one_pixel and ph + h <= kh and pw + w <= kw:
            weight, hwc = live_taps(self.weight, ph, pw, h, w, x.dtype)
            x = x.permute(0, 2, 3, 1) if hwc else x  # a view for channels-last activations
            return F.linear(x.flatten(1), weight, self.bias)[:, :, None, None]
        if (plain and self.out_channels == 1 and self.stride == (1, 1) and (ph, pw) == (kh // 2, kw // 2)
                and kh % 2 == 1 and kw % 2 == 1 and x.device.type == "cpu"
                and x.is_contiguous(memory_format=torch.channels_last)):
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return OneChannelConv.apply(x, self.weight, self.bias)
            if x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
                return one_channel_as_gemm(x, self.weight, self.bias)
        return super().forward(x)


def live_taps(weight, ph, pw, h, w, dtype):
    """The taps of a (C_out, C_in, kh, kw) conv weight that a one-pixel output reads from an
    h x w input, as a (C_out, h * w * C_in) matrix in `dtype`, and whether its columns run in
    (h, w, c) order (a channels-last weight) rather than (c, h, w)."""
    hwc = weight.is_contiguous(memory_format=torch.channels_last)
    return LiveTaps.apply(weight, (ph, pw, h, w), hwc, dtype), hwc


class LiveTaps(torch.autograd.Function):
    """weight[:, :, ph:ph + h, pw:pw + w] cast to `dtype` and flattened, in one copy, and in
    backward one zero-filled gradient of the weight's shape and layout with the live taps'
    gradient written into it. Sliced, reshaped and cast by autograd's own ops, a channels-last
    weight cost two copies in forward and two fills and three copies in backward, 7% of a bf16
    training step between the two bottleneck layers."""

    @staticmethod
    def forward(ctx, weight, window, hwc, dtype):
        ctx.window, ctx.hwc = window, hwc
        ctx.save_for_backward(weight)  # for its shape and layout only
        taps = LiveTaps.window_of(weight, window, hwc)
        out = torch.empty(taps.shape, dtype=dtype, device=weight.device)
        out.copy_(taps)
        return out.flatten(1)

    @staticmethod
    def window_of(weight, window, hwc):
        ph, pw, h, w = window
        return weight.permute(0, 2, 3, 1)[:, ph:ph + h, pw:pw + w] if hwc else weight[:, :, ph:ph + h, pw:pw + w]

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        # The weight's layout, so autograd keeps it as .grad with no copy; the dead taps'
        # gradient is exactly zero, as the stock layer's.
        full = torch.zeros_like(weight)
        taps = LiveTaps.window_of(full, ctx.window, ctx.hwc)
        taps.copy_(grad.view(taps.shape))
        return full, None, None, None


def one_channel_as_gemm(x, weight, bias):
    """F.conv2d(x, weight, bias, padding=k // 2) for odd k, computed as one matrix product of
    the channels-last pixels with every tap at once, (N*H*W, C) @ (C, k*k*C_out), then one
    shifted add per tap. oneDNN's kernel for one output channel ran at a tenth of the matmul
    rate here (the 32 -> 1 conv was a fifth of the IW bound's time for 4% of its FLOPs); this
    takes 40% less time at 28 x 28 and 64 x 64. Measured slower for 3 output channels, in
    bf16, in NCHW and with gradients, so Conv2d uses it only where it wins."""
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    ph, pw = kh // 2, kw // 2
    taps = (x.permute(0, 2, 3, 1) @ weight.permute(1, 2, 3, 0).reshape(c, kh * kw * c_out))
    taps = taps.view(n, h, w, kh, kw, c_out)
    out = taps[:, :, :, ph, pw].clone()
    if bias is not None:
        out += bias
    for i in range(kh):
        for j in range(kw):
            dh, dw = i - ph, j - pw  # output pixel (r, s) takes tap (i, j) of input pixel (r + dh, s + dw)
            if (dh, dw) != (0, 0):
                out[:, max(0, -dh):h - max(0, dh), max(0, -dw):w - max(0, dw)] += \
                    taps[:, max(0, dh):h - max(0, -dh), max(0, dw):w - max(0, -dw), i, j]
    return out.permute(0, 3, 1, 2)  # (N, C_out, H, W) in channels-last strides, as conv2d's would be


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d (same weights, same state_dict) that expands a one-pixel input as one
    matrix product: output pixel o gets exactly kernel tap o + padding, so no tap is wasted."""

    def forward(self, x, output_size=None):
        (ph, pw), (kh, kw) = self.padding, self.kernel_size
        (oph, opw) = self.output_padding
        out_h, out_w = kh - 2 * ph + oph, kw - 2 * pw + opw
        if not (x.shape[-2:] == (1, 1) and output_size is None and self.groups == 1
                and self.dilation == (1, 1) and ph + out_h <= kh and pw + out_w <= kw):
            return super().forward(x, output_size)
        # The weight is (C_in, C_out, kh, kw): its live taps as (C_in, out_h * out_w * C_out).
        weight, hwc = live_taps(self.weight, ph, pw, out_h, out_w, x.dtype)
        out = x.flatten(1) @ weight
        if hwc:  # (N, out_h, out_w, C_out) as NCHW with channels-last strides, what the next layers expect
            out = out.view(x.shape[0], out_h, out_w, self.out_channels).permute(0, 3, 1, 2)
        else:
            out = out.view(x.shape[0], self.out_channels, out_h, out_w)
        return out if self.bias is None else out + self.bias.to(out.dtype)[:, None, None]


class OneChannelConv(torch.autograd.Function):
    """F.conv2d(x, weight, bias, padding=k // 2) for odd k and one output channel: the stock
    forward, and a backward of two matrix products over the output gradient's k*k shifted
    copies (G, N*H*W rows by k*k columns): grad_x = G @ taps (channels-last), grad_w = G^T @ x.
    oneDNN's backward for this layer (32 -> 1 channels at 28 x 28) took 8% of a bf16 training
    step for 1% of its FLOPs; this takes 0.9 against 2.1 ms in bf16, 1.9 against 2.3 in fp32.
    x must be channels-last."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        weight = weight.to(x.dtype)  # what autocast would hand the kernel; kept for backward
        ctx.save_for_backward(x, weight)
        kh, kw = weight.shape[-2:]
        return F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), padding=(kh // 2, kw // 2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        n, c, h, w = x.shape
        kh, kw = weight.shape[-2:]
        ph, pw = kh // 2, kw // 2
        grad = grad.to(x.dtype)
        padded = F.pad(grad[:, 0], (pw, pw, ph, ph))
        # Column (i, j) at output pixel (r, s) is the gradient that tap (i, j) carries back to
        # input pixel (r, s): grad[r - i + ph, s - j + pw], zero outside the image.
        shifted = torch.stack([padded[:, 2 * ph - i:2 * ph - i + h, 2 * pw - j:2 * pw - j + w]
                               for i in range(kh) for j in range(kw)], -1).view(-1, kh * kw)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            taps = weight[0].permute(1, 2, 0).reshape(kh * kw, c)
            grad_x = (shifted @ taps).view(n, h, w, c).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            # (kh*kw, C) rows in (i, j) order are a (1, C, kh, kw) tensor's channels-last strides
            grad_w = (shifted.t() @ x.permute(0, 2, 3, 1).reshape(-1, c)).view(kh, kw, c).permute(2, 0, 1)[None]
            grad_w = grad_w.to(ctx.dtypes[0])
        if ctx.dtypes[1] is not None and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3), dtype=torch.promote_types(grad.dtype, ctx.dtypes[1]))
        return grad_x, grad_w, grad_b


class BernoulliNLL(torch.autograd.Function):
    """-log p(x | logits) of each pixel under a Bernoulli decoder, x broadcast against the
    logits: F.binary_cross_entropy_with_logits(logits, x, reduction="none"), written out as
    max(l, 0) - l x + log(1 + exp(-|l|)).

    torch's kernel calls log1p, which this torch build runs unvectorised on a CPU: 2.2 ms for
    128 colour 32 x 32 images, 15 times exp's cost, 4.5% of a bf16 training step and 6% of the
    IW bound. log(1 + e) with e = exp(-|l|) <= 1 vectorises and is off by at most e < 6e-8 where
    1 + e rounds to 1; measured against float64, its largest error per pixel (1e-6) and per
    image sum (1e-5 to 2e-5 nats) are the stock kernel's. 3 to 5 times faster."""

    @staticmethod
    def forward(ctx, logits, x):
        ctx.save_for_backward(logits, x)
        nll = logits.abs().neg_().exp_().add_(1).log_()
        return nll.add_(logits.clamp_min(0)).sub_(logits * x)

    @staticmethod
    def backward(ctx, grad):
        logits, x = ctx.saved_tensors
        grad_logits = grad * (torch.sigmoid(logits) - x) if ctx.needs_input_grad[0] else None
        grad_x = (-grad * logits).sum_to_size(x.shape) if ctx.needs_input_grad[1] else None
        return grad_logits, grad_x
