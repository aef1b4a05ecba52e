"""OnePromptNet: shapes, 1..K templates, padding invariance, interactive mode, size."""
from __future__ import annotations

import torch

from OnePromptSegLib.model import ModelConfig, OnePromptNet, ReadOut, count_parameters, sincos_2d


def _inputs(B=2, K=3, S=64):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(B, 1, S, S, generator=g), torch.rand(B, K, 1, S, S, generator=g),
            torch.rand(B, K, 4, S, S, generator=g), torch.randint(0, 4, (B, K), generator=g))


def test_shapes_for_one_to_k_templates():
    net = OnePromptNet(ModelConfig(size=64)).eval()
    for K in (1, 2, 4):
        q, t, p, k = _inputs(K=K)
        logits, qual = net(q, t, p, k)
        assert logits.shape == (2, 1, 64, 64) and qual.shape == (2,)
        assert ((qual >= 0) & (qual <= 1)).all()


def test_padded_templates_do_not_change_the_result():
    net = OnePromptNet(ModelConfig(size=64)).eval()
    q, t, p, k = _inputs(B=1, K=2)
    with torch.no_grad():
        a, qa = net(q, t, p, k)
        t3 = torch.cat([t, torch.rand(1, 1, 1, 64, 64)], 1)
        p3 = torch.cat([p, torch.rand(1, 1, 4, 64, 64)], 1)
        k3 = torch.cat([k, torch.zeros(1, 1, dtype=torch.long)], 1)
        valid = torch.tensor([[True, True, False]])
        b, qb = net(q, t3, p3, k3, valid)
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(qa, qb, atol=1e-5)


def test_interactive_mode_and_gradients():
    net = OnePromptNet(ModelConfig(size=64))
    q, _, p, k = _inputs(B=2, K=1)
    logits, qual = net(q, q[:, None], p, k)  # template == query
    (logits.mean() + qual.mean()).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_default_config_fits_the_size_budget():
    n = count_parameters(OnePromptNet(ModelConfig()))
    assert n * 2 <= 20 * 1024 * 1024  # fp16 bytes


def test_readout_equals_plain_softmax_attention_on_every_path():
    """The read-out writes its softmax out (normaliser from the value product, in place without autograd, no mask
    when ``valid`` is None): it must equal textbook masked softmax attention on every one of those paths."""
    import math

    torch.manual_seed(0)
    ro = ReadOut(8, 16, 5).eval()
    fq, ft, vals = torch.randn(2, 8, 6, 6), torch.randn(2, 3, 8, 6, 6), torch.rand(2, 3, 5, 6, 6)
    valid = torch.tensor([[True, True, False], [True, True, True]])

    def plain(v: torch.Tensor) -> torch.Tensor:
        pe = sincos_2d(6, 6, 16, fq.device, fq.dtype)
        q = ro.q(fq).flatten(2).transpose(1, 2) + pe
        k = (ro.k(ft.reshape(6, 8, 6, 6)).flatten(2).transpose(1, 2) + pe).reshape(2, 108, 16)
        logits = q @ k.transpose(1, 2) / math.sqrt(16)
        logits = logits.masked_fill(~v.repeat_interleave(36, dim=1)[:, None], float("-inf"))
        r = logits.softmax(-1) @ vals.permute(0, 1, 3, 4, 2).reshape(2, 108, 5)
        conf = logits.amax(-1, keepdim=True) / math.sqrt(16)
        return torch.cat([r, conf], -1).transpose(1, 2).reshape(2, 6, 6, 6)

    with torch.no_grad():
        want_masked, want_all = plain(valid), plain(torch.ones_like(valid))
        fast_masked, fast_all = ro(fq, ft, vals, valid), ro(fq, ft, vals, None)
    grad_masked = ro(fq, ft, vals, valid)  # autograd on: the out-of-place path
    for got, want in ((fast_masked, want_masked), (fast_all, want_all), (grad_masked.detach(), want_masked)):
        assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(want_masked, want_all, atol=1e-3)  # the mask does matter here
