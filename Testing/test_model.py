"""OnePromptNet: shapes, 1..K templates, padding invariance, interactive mode, size."""
from __future__ import annotations

import torch

from OnePromptSegLib.model import ModelConfig, OnePromptNet, count_parameters


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
