"""StoP predictor: parity with an independent reference, official state dict, and the noise semantics."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_official_checkpoint, official_predictor_state
from flexpredict_zoo.checkpoints import strip_prefix
from flexpredict_zoo.train import StoPPredictor
from reference_predictor import numpy_sincos_2d, reference_predictor

EMBED, WIDTH, HEADS, GRID = 64, 48, 4, 8  # tiny: encoder width 64, predictor width 48, 8x8 grid


def tiny(noise_std=0.25, depth=2, **kw):
    return StoPPredictor(GRID * GRID, EMBED, predictor_embed_dim=WIDTH, depth=depth, num_heads=HEADS,
                         noise_std=noise_std, **kw)


def randomise(model, seed=0):
    """Non-trivial values everywhere (biases, LayerNorms) so parity cannot pass by accident of the init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "predictor_pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.5) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def random_masks(batch, kc, kt, n_targets, n_patches, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.stack([torch.randperm(n_patches, generator=g)[:kc].sort().values for _ in range(batch)])
    tgts = [torch.stack([torch.randperm(n_patches, generator=g)[:kt].sort().values for _ in range(batch)])
            for _ in range(n_targets)]
    return ctx, tgts


def test_parity_with_reference_fresh_model():
    model = randomise(tiny()).eval()
    B, kc, kt = 3, 20, 9
    ctx, tgts = random_masks(B, kc, kt, 4, GRID * GRID)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(B, kc, EMBED, generator=g)
    noise = torch.randn(4 * B, kt, EMBED, generator=g) * 0.25
    out = model(tokens, [ctx], tgts, noise=noise)
    ref = reference_predictor(model.state_dict(), tokens, ctx, tgts, noise, HEADS)  # its own numpy sin-cos
    err = (out.double() - ref).abs().max().item()
    print(f"fresh-model parity: max abs error {err:.2e} (output scale {ref.abs().max().item():.2f})")
    assert out.shape == (4 * B, kt, EMBED)
    assert err < 1e-5


def test_parity_with_reference_official_state():
    embed, grid = 192, 14
    state = official_predictor_state(embed, grid * grid, depth=2)
    model = StoPPredictor(grid * grid, embed, depth=2, num_heads=12)
    model.load_state_dict(state, strict=True)
    B, kc, kt = 2, 30, 20
    ctx, tgts = random_masks(B, kc, kt, 4, grid * grid, seed=3)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(B, kc, embed, generator=g)
    noise = torch.randn(4 * B, kt, embed, generator=g) * 0.25
    out = model(tokens, ctx, tgts, noise=noise)
    ref = reference_predictor(state, tokens, ctx, tgts, noise, 12, use_state_pos_embed=True)
    err = (out.double() - ref).abs().max().item()
    print(f"official-state parity: max abs error {err:.2e}")
    assert err < 1e-5


def test_fixed_position_embedding_is_the_official_sincos():
    model = StoPPredictor(196, 192, depth=1)
    pe = model.predictor_pos_embed
    assert isinstance(pe, torch.nn.Parameter) and not pe.requires_grad and pe.shape == (1, 196, 384)
    assert torch.allclose(pe[0].double(), torch.from_numpy(numpy_sincos_2d(384, 14)), atol=1e-6)
    assert "predictor_pos_embed" not in {n for n, p in model.named_parameters() if p.requires_grad}


def test_state_dict_matches_official_and_loads_strict(tmp_path):
    embed, grid = 192, 14
    expected = official_predictor_state(embed, grid * grid, depth=2)
    model = StoPPredictor(grid * grid, embed, depth=2, num_heads=12)
    ours = model.state_dict()
    assert set(ours) == set(expected)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    ckpt = make_official_checkpoint(tmp_path / "stop.pth.tar")
    loaded = torch.load(tmp_path / "stop.pth.tar", weights_only=True)
    assert all(k.startswith("module.") for k in loaded["predictor"])
    result = model.load_state_dict(strip_prefix(loaded["predictor"]), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.predictor_embed.weight, ckpt["predictor"]["module.predictor_embed.weight"])


def capture_block_input(model):
    seen = []
    handle = model.predictor_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    return seen, handle


def test_noise_only_on_masked_tokens():
    model = randomise(tiny())
    B, kc, kt = 2, 16, 6
    ctx, tgts = random_masks(B, kc, kt, 4, GRID * GRID, seed=5)
    tokens = torch.randn(B, kc, EMBED)
    n1, n2 = torch.randn(2, 4 * B, kt, EMBED)
    seen, handle = capture_block_input(model)
    out1, out2 = model(tokens, ctx, tgts, noise=n1), model(tokens, ctx, tgts, noise=n2)
    handle.remove()
    x1, x2 = seen
    assert torch.equal(x1[:, :kc], x2[:, :kc])  # the context part of the sequence does not see the noise
    A = model.predictor_embed.weight.detach()
    assert torch.allclose(x1[:, kc:] - x2[:, kc:], (n1 - n2) @ A.T, atol=1e-5)  # masked tokens move by A (n1 - n2)
    assert (out1 - out2).abs().max() > 1e-3  # and the predictions change with the noise
    # perturbing the context changes the context part only by predictor_embed's linear map
    seen, handle = capture_block_input(model)
    model(tokens + 1.0, ctx, tgts, noise=n1)
    handle.remove()
    assert torch.allclose(seen[0][:, kc:], x1[:, kc:])
    assert torch.allclose(seen[0][:, :kc] - x1[:, :kc], A.sum(1).expand(4 * B, kc, -1), atol=1e-5)


def test_fresh_noise_per_call_token_sample_and_block():
    model = randomise(tiny())
    B, kc, kt = 3, 10, 5
    ctx, _ = random_masks(B, kc, kt, 4, GRID * GRID)
    same = torch.arange(kt).expand(B, kt)  # every block and sample at the same positions
    tokens = torch.randn(B, kc, EMBED)
    model.train()
    seen, handle = capture_block_input(model)
    a, b = model(tokens, ctx, [same] * 4), model(tokens, ctx, [same] * 4)
    model.eval()
    c = model(tokens, ctx, [same] * 4)  # official behaviour: noise in eval mode too
    handle.remove()
    assert (a - b).abs().max() > 1e-3 and (b - c).abs().max() > 1e-3
    masked = seen[0][:, kc:]  # (4B, kt, W): same positions everywhere, so differences are the noise alone
    flat = masked.reshape(-1, WIDTH)
    distances = torch.cdist(flat, flat) + torch.eye(flat.shape[0]) * 1e9
    assert distances.min() > 1e-4  # no two tokens (any block, sample or position) share a noise draw
    torch.manual_seed(123)
    d = model(tokens, ctx, [same] * 4)
    torch.manual_seed(123)
    assert torch.equal(d, model(tokens, ctx, [same] * 4))  # reproducible under the global RNG


@pytest.mark.parametrize("noise_std", [0.25, 0.5])
def test_noise_std_is_a_standard_deviation(noise_std):
    torch.manual_seed(0)
    model = randomise(tiny(noise_std=noise_std, depth=1))
    B, kc, kt = 64, 4, 16
    ctx, _ = random_masks(B, kc, kt, 1, GRID * GRID)
    tgt = torch.arange(kt).expand(B, kt)
    seen, handle = capture_block_input(model)
    model(torch.randn(B, kc, EMBED), ctx, [tgt] * 4)
    handle.remove()
    psi = model.predictor_pos_embed[0, :kt]
    mapped = seen[0][:, kc:] - psi - model.predictor_embed.bias.detach()  # = A n, (4B, kt, W)
    samples = mapped.reshape(-1, WIDTH)  # 4096 draws
    measured = samples.std(0)
    expected = noise_std * model.predictor_embed.weight.detach().norm(dim=1)
    rel = (measured / expected - 1).abs()
    print(f"noise_std={noise_std}: std/expected mean {float((measured / expected).mean()):.4f}, max dev {float(rel.max()):.3f}")
    assert float(rel.mean()) < 0.02 and float(rel.max()) < 0.06
    assert samples.mean(0).abs().max() < 4 * expected.max() / math.sqrt(samples.shape[0])


def test_zero_noise_std_is_explicit_zero_noise_and_deterministic():
    det = randomise(tiny(noise_std=0.0))
    B, kc, kt = 2, 12, 7
    ctx, tgts = random_masks(B, kc, kt, 4, GRID * GRID)
    tokens = torch.randn(B, kc, EMBED)
    out = det(tokens, ctx, tgts)
    assert torch.allclose(out, det(tokens, ctx, tgts, noise=torch.zeros(4 * B, kt, EMBED)), atol=1e-6)
    assert torch.equal(out, det(tokens, ctx, tgts))
    stochastic = tiny(noise_std=0.25)
    stochastic.load_state_dict(det.state_dict())
    assert torch.allclose(out, stochastic(tokens, ctx, tgts, noise=torch.zeros(4 * B, kt, EMBED)), atol=1e-6)


def test_gradient_reaches_predictor_embed_weight_through_noise():
    B, kc, kt = 2, 8, 5
    ctx, tgts = random_masks(B, kc, kt, 4, GRID * GRID)
    zeros = torch.zeros(B, kc, EMBED)  # zero context: the context path gives predictor_embed.weight no gradient
    grads = {}
    for std in (0.0, 0.25):
        model = randomise(tiny(noise_std=std))
        model(zeros, ctx, tgts).square().sum().backward()
        grads[std] = model.predictor_embed.weight.grad.abs().sum().item()
        assert model.predictor_pos_embed.grad is None
    assert grads[0.0] == 0.0 and grads[0.25] > 1e-3


def test_output_shape_contract_and_errors():
    model = tiny()
    B, kc, kt = 3, 11, 6
    ctx, tgts = random_masks(B, kc, kt, 4, GRID * GRID)
    assert model(torch.randn(B, kc, EMBED), [ctx], tgts).shape == (4 * B, kt, EMBED)
    assert model(torch.randn(B, kc, EMBED), ctx, tgts[0]).shape == (B, kt, EMBED)  # single tensors accepted
    ctx2, _ = random_masks(B, kc, kt, 1, GRID * GRID, seed=9)
    assert model(torch.randn(2 * B, kc, EMBED), [ctx, ctx2], tgts).shape == (8 * B, kt, EMBED)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(torch.randn(B, kc, EMBED), ctx, tgts, noise=torch.randn(B, kt, EMBED))
    with pytest.raises(ValueError, match="context_tokens"):
        model(torch.randn(B, kc, EMBED + 1), ctx, tgts)
    with pytest.raises(ValueError, match="same"):
        model(torch.randn(B, kc, EMBED), ctx, [tgts[0], tgts[1][:, :3]])
    with pytest.raises(ValueError, match="standard deviation"):
        tiny(noise_std=-1)


def test_grad_checkpointing_matches():
    model = randomise(tiny()).train()
    B, kc, kt = 2, 10, 4
    ctx, tgts = random_masks(B, kc, kt, 4, GRID * GRID)
    tokens, noise = torch.randn(B, kc, EMBED), torch.randn(4 * B, kt, EMBED)
    plain = model(tokens, ctx, tgts, noise=noise)
    model.set_grad_checkpointing(True)
    assert torch.allclose(plain, model(tokens, ctx, tgts, noise=noise), atol=1e-6)


def test_official_init():
    model = StoPPredictor(196, 768, depth=6, num_heads=12)
    for i, block in enumerate(model.predictor_blocks, start=1):
        assert abs(block.attn.proj.weight.std().item() - 0.02 / math.sqrt(2 * i)) < 0.0005
        assert abs(block.mlp.fc2.weight.std().item() - 0.02 / math.sqrt(2 * i)) < 0.0005
        assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.0005
        assert block.attn.qkv.bias.abs().max() == 0 and block.norm1.eps == 1e-6
    assert abs(model.mask_token.std().item() - 0.02) < 0.004
    assert model.predictor_embed.bias.abs().max() == 0
