"""UNet + ControlNet at the real SD-1.5 shapes (64x64 latents) against diffusers, fp32, random weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet

from tests.test_parity import FP32_TOL, to_bgjax
from tests.torch_reference import SD15, nhwc, rel_err


@pytest.mark.slow
@pytest.mark.big_memory(weights_gb=4.9)
def test_sd15_unet_with_controlnet_matches_diffusers():
    torch.manual_seed(0)
    unet = TorchUNet(**SD15).eval()
    cnet = TorchControlNet.from_unet(unet).eval()
    with torch.no_grad():  # zero convs would hide a wrong residual path
        for name, p in cnet.named_parameters():
            if name.startswith("controlnet_") and ("down_blocks" in name or "mid_block" in name or "conv_out" in name):
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 64, 64, generator=g), torch.tensor([421])
    ctx, cond = torch.randn(1, 77, 768, generator=g), torch.rand(1, 3, 512, 512, generator=g)
    with torch.no_grad():
        down, mid = cnet(x, t, ctx, controlnet_cond=cond, return_dict=False)
        want = nhwc(unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample)
    cn_module, cn_params = to_bgjax("controlnet", cnet, dict(cnet.config))
    del cnet
    un_module, un_params = to_bgjax("unet", unet, dict(unet.config))
    del unet
    got_down, got_mid = cn_module.apply({"params": cn_params}, nhwc(x), t.numpy(), ctx.numpy(), nhwc(cond))
    assert rel_err(got_mid, nhwc(mid)) <= FP32_TOL
    got = un_module.apply({"params": un_params}, nhwc(x), t.numpy(), ctx.numpy(), got_down, got_mid)
    err = rel_err(got, want)
    print(f"SD-1.5 UNet+ControlNet fp32 relative error: {err:.2e}")
    assert err <= FP32_TOL
