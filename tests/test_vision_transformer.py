"""The registered FlexPredict ViT against an independent reference of the official encoder, and the timm API.

CPU, fp32, tiny models. The parity tests print the largest absolute error they measure
(`python -m pytest -q -s tests/test_vision_transformer.py -k parity`).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import flexpredict_zoo
from flexpredict_zoo import manifest
from flexpredict_zoo.vision_transformer import FlexPredictViT, gather_tokens

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_ARCH, make_official_checkpoint, official_encoder_state  # noqa: E402
from reference_encoder import ReferenceEncoder  # noqa: E402

TOL = 1e-5
HEADS = TINY_ARCH["num_heads"]
SMALL = dict(depth=2, embed_dim=64, num_heads=2)  # for API checks that need no weights


def _report(what: str, err: float) -> None:
    print(f"\n[parity] {what}: max abs error {err:.3e}")


def _images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "vit-ti16.pth.tar"
    return path, make_official_checkpoint(path)


def _pretrained(checkpoint, **kwargs):
    path, _ = checkpoint
    return timm.create_model("flexpredict_vit_ti16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **kwargs).eval()


def _reference(checkpoint, img_size=224, encoder="target_encoder"):
    return ReferenceEncoder.from_official(checkpoint[1][encoder], num_heads=HEADS, img_size=img_size)


@pytest.fixture(scope="module")
def model224(checkpoint):
    return _pretrained(checkpoint)


@pytest.fixture(scope="module")
def ref224(checkpoint):
    return _reference(checkpoint)


# ---------------------------------------------------------------------------------------------------- parity


@torch.no_grad()
def test_parity_224_pooled_and_every_token(checkpoint, model224, ref224):
    model, ref = model224, ref224
    x = _images(2, 3, 224, 224)
    tokens, ref_tokens = model.forward_features(x), ref.forward_tokens(x)
    assert tokens.shape == ref_tokens.shape == (2, 196, 192)
    pooled, ref_pooled = model(x), ref(x)
    assert pooled.shape == (2, 192)
    err_tokens, err_pooled = (tokens - ref_tokens).abs().max().item(), (pooled - ref_pooled).abs().max().item()
    _report("ti16 224 tokens", err_tokens)
    _report("ti16 224 pooled", err_pooled)
    assert err_tokens < TOL and err_pooled < TOL
    # The default encoder is the EMA target encoder: the context encoder's outputs are measurably different.
    other = _reference(checkpoint, encoder="encoder")(x)
    assert (pooled - other).abs().max() > 100 * TOL


@torch.no_grad()
def test_parity_other_img_size(checkpoint):
    model, ref = _pretrained(checkpoint, img_size=160), _reference(checkpoint, img_size=160)
    assert model.pos_embed.shape == (1, 100, 192)
    x = _images(2, 3, 160, 160, seed=1)
    tokens, ref_tokens = model.forward_features(x), ref.forward_tokens(x)
    assert tokens.shape == (2, 100, 192)
    err_tokens, err_pooled = (tokens - ref_tokens).abs().max().item(), (model(x) - ref(x)).abs().max().item()
    _report("ti16 img_size=160 tokens", err_tokens)
    _report("ti16 img_size=160 pooled", err_pooled)
    assert err_tokens < TOL and err_pooled < TOL


@torch.no_grad()
def test_parity_dynamic_img_size_non_square(checkpoint):
    model = _pretrained(checkpoint, dynamic_img_size=True)
    for height, width in ((224, 224), (160, 256), (96, 48)):
        ref = _reference(checkpoint, img_size=(height, width))
        x = _images(1, 3, height, width, seed=height + width)
        tokens, ref_tokens = model.forward_features(x), ref.forward_tokens(x)
        assert tokens.shape == (1, (height // 16) * (width // 16), 192)
        err_tokens, err_pooled = (tokens - ref_tokens).abs().max().item(), (model(x) - ref(x)).abs().max().item()
        _report(f"ti16 dynamic {height}x{width} tokens", err_tokens)
        _report(f"ti16 dynamic {height}x{width} pooled", err_pooled)
        assert err_tokens < TOL and err_pooled < TOL


@pytest.mark.slow
@torch.no_grad()
def test_parity_b16(tmp_path):
    state = official_encoder_state(embed_dim=768, depth=12, num_heads=12, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "vit-b16-encoder.pth"
    torch.save({"target_encoder": {f"module.{k}": v for k, v in state.items()}}, path)
    model = timm.create_model("flexpredict_vit_b16", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    ref = ReferenceEncoder.from_official(state, num_heads=12)
    x = _images(2, 3, 224, 224, seed=4)
    tokens, ref_tokens = model.forward_features(x), ref.forward_tokens(x)
    pooled = model.forward_head(tokens)
    assert tokens.shape == (2, 196, 768) and pooled.shape == (2, 768)
    err_tokens, err_pooled = (tokens - ref_tokens).abs().max().item(), (pooled - ref_tokens.mean(1)).abs().max().item()
    _report("b16 224 tokens", err_tokens)
    _report("b16 224 pooled", err_pooled)
    assert err_tokens < TOL and err_pooled < TOL


@torch.no_grad()
def test_forward_masked_matches_forward_features_and_reference(model224, ref224):
    model, ref = model224, ref224
    x = _images(2, 3, 224, 224, seed=5)
    every = torch.arange(196).expand(2, -1)
    assert (model.forward_masked(x, every) - model.forward_features(x)).abs().max() < TOL
    assert (model.forward_masked(x) - model.forward_features(x)).abs().max() < TOL
    g = torch.Generator().manual_seed(6)
    masks = [torch.stack([torch.randperm(196, generator=g)[:40] for _ in range(2)]) for _ in range(3)]
    out = model.forward_masked(x, masks)
    assert out.shape == (6, 40, 192)  # concatenated along the batch, mask-major
    err = (out - ref.forward_tokens(x, masks)).abs().max().item()
    _report("ti16 forward_masked subset tokens", err)
    assert err < TOL
    # Kept tokens attend only to each other: the result is not the full-image tokens gathered afterwards.
    assert (out[:2] - gather_tokens(model.forward_features(x), masks[0])).abs().max() > 100 * TOL
    single = model.forward_masked(x, masks[1])
    assert (single - out[2:4]).abs().max() < TOL


# ---------------------------------------------------------------------------------------------------- position embedding


def test_pos_embed_is_fixed_and_official_layout():
    model = timm.create_model("flexpredict_vit_ti16", **SMALL)
    names = [n for n, _ in model.named_parameters()]
    assert not any("pos_embed" in n for n in names)
    assert "pos_embed" not in model.state_dict()
    assert model.pos_embed.shape == (1, 196, 64) and not model.pos_embed.requires_grad
    pe = model.pos_embed[0].reshape(14, 14, 64)
    # Tokens in one column share the first half (column code); moving one column changes only the first half.
    assert torch.equal(pe[3, 5, 32:], pe[3, 6, 32:])
    assert (pe[3, 5, :32] - pe[3, 6, :32]).abs().max() > 0.1
    assert torch.equal(pe[3, 5, :32], pe[9, 5, :32])
    assert (pe[3, 5, 32:] - pe[9, 5, 32:]).abs().max() > 0.1
    ref = ReferenceEncoder(64, 1, 2, img_size=224).pos_embed
    assert torch.equal(model.pos_embed, ref)


def test_pos_embed_is_not_trained():
    model = timm.create_model("flexpredict_vit_ti16", **SMALL)
    before = model.pos_embed.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(_images(1, 3, 224, 224)).sum().backward()
    opt.step()
    assert torch.equal(model.pos_embed, before)


# ---------------------------------------------------------------------------------------------------- timm API


def test_forward_shapes_head_and_reset_classifier():
    model = timm.create_model("flexpredict_vit_ti16", **SMALL).eval()
    x = _images(2, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 196, 64)
        assert model.num_classes == 0 and isinstance(model.head, torch.nn.Identity)
        pooled = model(x)
        assert pooled.shape == (2, 64)
        assert (pooled - feats.mean(1)).abs().max() < 1e-6
        assert torch.equal(model.forward_head(feats, pre_logits=True), pooled)

        classifier = timm.create_model("flexpredict_vit_ti16", num_classes=10, **SMALL).eval()
        assert classifier(x).shape == (2, 10)
        assert classifier.forward_head(classifier.forward_features(x), pre_logits=True).shape == (2, 64)
        classifier.reset_classifier(5)
        assert classifier(x).shape == (2, 5) and classifier.head.out_features == 5
        classifier.reset_classifier(0)
        assert classifier(x).shape == (2, 64)


def test_num_classes_loads_backbone_with_fresh_head(checkpoint, ref224):
    model, ref = _pretrained(checkpoint, num_classes=10), ref224
    x = _images(1, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (1, 10)
        assert (model.forward_head(model.forward_features(x), pre_logits=True) - ref(x)).abs().max() < TOL


@torch.no_grad()
def test_forward_intermediates():
    model = timm.create_model("flexpredict_vit_ti16", depth=3, embed_dim=64, num_heads=2).eval()
    x = _images(2, 3, 224, 224)
    final, inter = model.forward_intermediates(x, indices=[0, 2], output_fmt="NCHW")
    assert torch.allclose(final, model.forward_features(x), atol=TOL)
    assert [t.shape for t in inter] == [(2, 64, 14, 14)] * 2
    nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
    assert [t.shape for t in nlc] == [(2, 196, 64)] * 2  # int: the last 2 blocks
    assert torch.equal(nlc[1].transpose(1, 2).reshape(2, 64, 14, 14), inter[1])
    normed = model.forward_intermediates(x, indices=[2], norm=True, output_fmt="NLC", intermediates_only=True)
    assert (normed[0] - model.forward_features(x)).abs().max() < TOL  # last block + final norm = forward_features
    assert (normed[0] - nlc[1]).abs().max() > 0.1


@torch.no_grad()
def test_features_only():
    model = timm.create_model("flexpredict_vit_ti16", depth=4, embed_dim=64, num_heads=2, features_only=True,
                              out_indices=(1, 3)).eval()
    out = model(_images(2, 3, 224, 224))
    assert [t.shape for t in out] == [(2, 64, 14, 14)] * 2
    assert model.feature_info.channels() == [64, 64] and model.feature_info.reduction() == [16, 16]


@torch.no_grad()
def test_img_size_and_dynamic_img_size_shapes():
    for size in (96, 160, 256):
        model = timm.create_model("flexpredict_vit_ti16", img_size=size, **SMALL).eval()
        grid = size // 16
        assert model.pos_embed.shape == (1, grid * grid, 64)
        assert model.forward_features(_images(1, 3, size, size)).shape == (1, grid * grid, 64)
        assert model(_images(1, 3, size, size)).shape == (1, 64)
    model = timm.create_model("flexpredict_vit_ti16", dynamic_img_size=True, **SMALL).eval()
    for height, width in ((224, 224), (64, 224), (240, 112), (32, 32)):
        x = _images(1, 3, height, width)
        assert model.forward_features(x).shape == (1, (height // 16) * (width // 16), 64)
        inter = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert inter[0].shape == (1, 64, height // 16, width // 16)
    fixed = timm.create_model("flexpredict_vit_ti16", **SMALL)
    with pytest.raises(AssertionError):  # timm's strict size check: a fixed-size model refuses other sizes
        fixed(_images(1, 3, 160, 160))


def test_set_input_size_regenerates_pos_embed():
    model = timm.create_model("flexpredict_vit_ti16", **SMALL)
    model.set_input_size(img_size=128)
    assert torch.equal(model.pos_embed, ReferenceEncoder(64, 1, 2, img_size=128).pos_embed)
    assert "pos_embed" not in model.state_dict()
    assert model.forward_features(_images(1, 3, 128, 128)).shape == (1, 64, 64)


def _loss_and_grads(model, x, masks=None):
    model.zero_grad()
    out = model.forward_masked(x, masks) if masks is not None else model(x)
    (out.square().mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("masked", [False, True])
def test_grad_checkpointing_same_outputs_and_grads(masked):
    model = timm.create_model("flexpredict_vit_ti16", depth=3, embed_dim=64, num_heads=2, img_size=64).train()
    x = _images(2, 3, 64, 64)
    masks = [torch.tensor([[0, 3, 5, 9, 15], [1, 2, 4, 8, 10]])] if masked else None
    out, grads = _loss_and_grads(model, x, masks)
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    out_ckpt, grads_ckpt = _loss_and_grads(model, x, masks)
    assert (out - out_ckpt).abs().max() < TOL
    assert grads.keys() == grads_ckpt.keys()
    assert all(grads[n].abs().sum() > 0 for n in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight"))
    worst = max((grads[n] - grads_ckpt[n]).abs().max().item() for n in grads)
    assert worst < TOL


def _compiler_missing() -> str:
    if not hasattr(torch, "compile"):
        return "torch.compile is not available in this torch"
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        return "no C++ compiler on PATH: torch.compile's CPU backend (inductor) needs one"
    return ""


@pytest.mark.skipif(bool(_compiler_missing()), reason=_compiler_missing() or "n/a")
@torch.no_grad()
def test_torch_compile_same_outputs():
    model = timm.create_model("flexpredict_vit_ti16", depth=2, embed_dim=64, num_heads=2, img_size=64).eval()
    x = _images(2, 3, 64, 64)
    compiled = torch.compile(model)
    err = (compiled(x) - model(x)).abs().max().item()
    print(f"\n[compile] max abs error {err:.3e}")
    assert err < TOL


def test_data_config_and_transform_are_the_official_evaluation():
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    model = timm.create_model("flexpredict_vit_ti16", **SMALL)
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == 1.0 and config["interpolation"] == "bilinear"
    transform = create_transform(**config)
    steps = transform.transforms
    resize, crop, normalize = steps[0], steps[1], steps[-1]
    assert isinstance(resize, T.Resize) and resize.size == 224  # int: the short side goes to 224
    assert resize.interpolation == InterpolationMode.BILINEAR
    assert isinstance(crop, T.CenterCrop) and tuple(crop.size) == (224, 224)
    assert isinstance(normalize, T.Normalize)
    assert torch.allclose(torch.as_tensor(normalize.mean), torch.tensor([0.485, 0.456, 0.406]))
    assert torch.allclose(torch.as_tensor(normalize.std), torch.tensor([0.229, 0.224, 0.225]))
    image = Image.fromarray((torch.rand(200, 300, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    out = transform(image)
    assert out.shape == (3, 224, 224)
    expected = T.Compose([T.Resize(224, InterpolationMode.BILINEAR), T.CenterCrop(224), T.ToTensor(),
                          T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    assert torch.equal(out, expected)


def test_pretrained_cfg_fields():
    model = timm.create_model("flexpredict_vit_b16", depth=1)  # depth=1: cfg check only, no weights needed
    cfg = model.pretrained_cfg
    assert cfg["tag"] == "stop_in1k" and cfg["license"] == "cc-by-nc-4.0"
    assert cfg["paper_ids"] == "arXiv:2308.00566"
    assert cfg["num_classes"] == 0 and cfg["classifier"] == "head"
    assert cfg["hf_hub_id"].split("@")[0] == "amirbar1/StoP" and cfg["hf_hub_filename"] == "vit-b16.pth.tar"
    assert cfg["fixed_input_size"] is True  # as timm's own ViTs: other sizes need img_size or dynamic_img_size
    context = timm.create_model("flexpredict_vit_b16.stop_in1k_context", depth=1).pretrained_cfg
    assert context["tag"] == "stop_in1k_context"
    # The encoder is a field of the manifest entry, not a note to parse.
    assert not [note for c in (cfg, context) for note in c["notes"] if note.startswith("encoder")]


def test_list_models_and_pretrained_tags():
    names = set(timm.list_models("flexpredict*"))
    assert names == set(manifest.model_names())
    assert {"flexpredict_vit_b16", "flexpredict_vit_l16", "flexpredict_vit_h16", "flexpredict_vit_ti16",
            "flexpredict_vit_s16", "flexpredict_vit_m4_32"} <= names
    tags = set(timm.list_pretrained("flexpredict*"))
    expected = {f"{m}.{w['tag']}" for m, e in manifest.load_manifest()["models"].items() for w in e["weights"]}
    assert tags == expected
    assert {"flexpredict_vit_b16.stop_in1k", "flexpredict_vit_b16.stop_in1k_context",
            "flexpredict_vit_l16.stop_in1k", "flexpredict_vit_h16.stop_in1k"} <= tags


def test_unknown_model_name():
    with pytest.raises(RuntimeError, match="flexpredict_vit_b61"):  # timm's own message
        timm.create_model("flexpredict_vit_b61")
    with pytest.raises(flexpredict_zoo.UnknownModelError) as info:
        manifest.model_entry("flexpredict_vit_b61")
    assert "Did you mean flexpredict_vit_b16" in str(info.value)
    assert "flexpredict_vit_l16" in str(info.value)  # the known models are listed


def test_architecture_guards():
    for bad in (dict(class_token=True), dict(fc_norm=True), dict(pos_embed="learn"), dict(reg_tokens=4)):
        with pytest.raises(ValueError, match="FlexPredictViT requires"):
            FlexPredictViT(**bad)


def test_norm_and_pool_match_official():
    model = timm.create_model("flexpredict_vit_ti16", **SMALL)
    layer_norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(layer_norms) == 2 * 2 + 1 and all(m.eps == 1e-6 for m in layer_norms)
    assert model.global_pool == "avg" and model.num_prefix_tokens == 0 and model.cls_token is None
    assert isinstance(model.fc_norm, torch.nn.Identity)
    assert model.blocks[0].attn.qkv.bias is not None
    assert isinstance(model.blocks[0].mlp.act, torch.nn.GELU) and model.blocks[0].mlp.fc1.out_features == 256


# ---------------------------------------------------------------------------------------------------- every model
# timm's API on every registered FlexPredict model, as timm's own tests run over its models. Shapes, device and
# dtype are checked on the meta device (the full architecture, no memory); numbers on real weights at the
# smallest input (a 2x2 patch grid), so the ViT-L/H cases stay cheap.

ALL_MODELS = timm.list_models("flexpredict_*")
ARCH = {name: manifest.model_entry(name)["architecture"] for name in ALL_MODELS}


def _meta_images(batch, height, width=None, dtype=torch.float32):
    return torch.empty(batch, 3, height, width or height, device="meta", dtype=dtype)


def test_every_manifest_model_is_covered():
    assert ALL_MODELS == sorted(manifest.model_names()) and len(ALL_MODELS) >= 6


@pytest.fixture(scope="module", params=ALL_MODELS)
def small_model(request):
    """(name, model) with real weights at a 2x2 patch grid; weight_init='skip' only saves the init time."""
    name = request.param
    size = 2 * ARCH[name]["patch_size"]
    return name, timm.create_model(name, img_size=size, weight_init="skip").eval()


@torch.no_grad()
def test_forward_features_head_and_pooling(small_model):
    name, model = small_model
    arch, size = ARCH[name], 2 * ARCH[name]["patch_size"]
    x = _images(2, 3, size, size, seed=7)
    feats = model.forward_features(x)
    assert feats.shape == (2, 4, arch["embed_dim"]) and torch.isfinite(feats).all()
    pooled = model(x)
    assert pooled.shape == (2, arch["embed_dim"]) == (2, model.num_features) == (2, model.head_hidden_size)
    assert (pooled - feats.mean(1)).abs().max() < TOL  # mean over every token, no class token
    assert torch.equal(model.forward_head(feats, pre_logits=True), pooled)
    assert torch.equal(model.forward_head(feats), pooled)  # num_classes=0: no classifier


@torch.no_grad()
def test_forward_intermediates_every_model(small_model):
    name, model = small_model
    arch, size = ARCH[name], 2 * ARCH[name]["patch_size"]
    last = arch["depth"] - 1
    x = _images(1, 3, size, size, seed=8)
    final, inter = model.forward_intermediates(x, indices=[0, last], output_fmt="NCHW")
    assert (final - model.forward_features(x)).abs().max() < TOL
    assert [t.shape for t in inter] == [(1, arch["embed_dim"], 2, 2)] * 2
    normed = model.forward_intermediates(x, indices=[last], norm=True, output_fmt="NLC", intermediates_only=True)
    assert (normed[0] - final).abs().max() < TOL  # the last block + final norm is forward_features
    assert len(model.forward_intermediates(x, intermediates_only=True)) == arch["depth"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_default_size_and_architecture_on_meta(name):
    arch = ARCH[name]
    model = timm.create_model(name, device="meta").eval()
    grid = arch["img_size"] // arch["patch_size"]
    x = _meta_images(2, arch["img_size"])
    assert model.forward_features(x).shape == (2, grid * grid, arch["embed_dim"])
    assert model(x).shape == (2, arch["embed_dim"])
    assert len(model.blocks) == arch["depth"] and model.blocks[0].attn.num_heads == arch["num_heads"]
    assert model.blocks[0].mlp.fc1.out_features == arch["embed_dim"] * arch["mlp_ratio"]
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, arch["img_size"], arch["img_size"]) and cfg["fixed_input_size"] is True
    assert model.in_chans == 3 and model.num_classes == 0


@pytest.mark.parametrize("name", ALL_MODELS)
def test_features_only_every_model(name):
    arch = ARCH[name]
    p, dim, last = arch["patch_size"], arch["embed_dim"], arch["depth"] - 1
    default = timm.create_model(name, features_only=True, device="meta")
    assert default.feature_info.channels() == [dim] * 3  # the last three blocks by default
    model = timm.create_model(name, features_only=True, out_indices=(0, last), device="meta")
    assert model.feature_info.channels() == [dim, dim] and model.feature_info.reduction() == [p, p]
    out = model(_meta_images(1, arch["img_size"]))
    grid = arch["img_size"] // p
    assert [t.shape for t in out] == [(1, dim, grid, grid)] * 2


@pytest.mark.parametrize("name", ALL_MODELS)
def test_other_input_sizes_every_model(name):
    arch = ARCH[name]
    p, dim = arch["patch_size"], arch["embed_dim"]
    for size in (2 * p, 3 * p):
        model = timm.create_model(name, img_size=size, device="meta")
        assert model.pos_embed.shape == (1, (size // p) ** 2, dim)
        assert model.forward_features(_meta_images(1, size)).shape == (1, (size // p) ** 2, dim)
        assert model.pretrained_cfg["input_size"] == (3, arch["img_size"], arch["img_size"])  # the weights' size
    dynamic = timm.create_model(name, dynamic_img_size=True, device="meta")
    for height, width in ((2 * p, 3 * p), (5 * p, p)):
        x = _meta_images(1, height, width)
        assert dynamic.forward_features(x).shape == (1, (height // p) * (width // p), dim)
        inter = dynamic.forward_intermediates(x, indices=[0], intermediates_only=True)
        assert inter[0].shape == (1, dim, height // p, width // p)
    fixed = timm.create_model(name, device="meta")
    with pytest.raises(AssertionError, match="doesn't match model"):  # fixed_input_size, as the cfg says
        fixed(_meta_images(1, 3 * p))
    fixed.set_input_size(img_size=3 * p)
    assert fixed.forward_features(_meta_images(1, 3 * p)).shape == (1, 9, dim)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_and_dtype_kwargs(name, dtype):
    arch = ARCH[name]
    model = timm.create_model(name, device="meta", dtype=dtype)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert "pos_embed" in dict(model.named_buffers())
    assert not [n for n, t in tensors.items() if t.device.type != "meta" or t.dtype != dtype]
    assert model(_meta_images(1, arch["img_size"], dtype=dtype)).dtype == dtype
    model.set_input_size(img_size=2 * arch["img_size"])
    assert model.pos_embed.device.type == "meta" and model.pos_embed.dtype == dtype


@torch.no_grad()
def test_bfloat16_forward_on_cpu():
    fp32 = timm.create_model("flexpredict_vit_ti16", img_size=64, **SMALL).eval()
    bf16 = timm.create_model("flexpredict_vit_ti16", img_size=64, dtype=torch.bfloat16, **SMALL).eval()
    bf16.load_state_dict(fp32.state_dict())
    assert bf16.pos_embed.dtype == torch.bfloat16 and torch.equal(bf16.pos_embed, fp32.pos_embed.bfloat16())
    x = _images(2, 3, 64, 64)
    out = bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - fp32(x)).abs().max() < 0.1  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("name", ALL_MODELS)
def test_no_weight_decay_names_parameters_only(name):
    model = timm.create_model(name, device="meta")
    params = {n for n, _ in model.named_parameters()}
    skipped = model.no_weight_decay()
    assert "pos_embed" not in skipped  # a fixed buffer here, not a parameter
    assert all(n in params or getattr(model, n, None) is None for n in skipped), skipped


def _depth1_checkpoint(name, path):
    arch = ARCH[name]
    ckpt = make_official_checkpoint(path, arch=dict(embed_dim=arch["embed_dim"], depth=1, num_heads=arch["num_heads"],
                                                    patch_size=arch["patch_size"], img_size=arch["img_size"]))
    return {k[len("module."):]: v for k, v in ckpt["target_encoder"].items()}


@pytest.mark.parametrize("name", ALL_MODELS)
@torch.no_grad()
def test_load_adapts_in_chans_and_num_classes(name, tmp_path):
    # depth=1 keeps the ViT-H file small; the width, heads and patch size are the model's own.
    path = tmp_path / "ckpt.pth.tar"
    target = _depth1_checkpoint(name, path)
    p, dim = ARCH[name]["patch_size"], ARCH[name]["embed_dim"]
    kwargs = dict(depth=1, img_size=2 * p, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    grey = timm.create_model(name, in_chans=1, num_classes=10, **kwargs).eval()
    rgb = timm.create_model(name, **kwargs).eval()
    # timm's first-conv adaptation for one channel sums the RGB kernels: a grey model on a grey image is the
    # RGB model on that image repeated in three channels.
    assert grey.patch_embed.proj.weight.shape == (dim, 1, p, p)
    assert (grey.patch_embed.proj.weight - target["patch_embed.proj.weight"].sum(1, keepdim=True)).abs().max() < 1e-6
    assert grey.head.weight.shape == (10, dim)
    state = grey.state_dict()
    assert all(torch.equal(state[k], v) for k, v in target.items() if k not in ("pos_embed", "patch_embed.proj.weight"))
    x = _images(2, 1, 2 * p, 2 * p, seed=9)
    pre_logits = grey.forward_head(grey.forward_features(x), pre_logits=True)
    assert (pre_logits - rgb(x.expand(-1, 3, -1, -1))).abs().max() < 1e-4
    assert grey(x).shape == (2, 10)


@torch.no_grad()
def test_shipped_weights_load_with_in_chans_and_num_classes():
    rgb = timm.create_model("flexpredict_vit_m4_32", pretrained=True).eval()
    grey = timm.create_model("flexpredict_vit_m4_32", pretrained=True, in_chans=1, num_classes=5).eval()
    assert torch.equal(grey.patch_embed.proj.weight, rgb.patch_embed.proj.weight.sum(1, keepdim=True))
    x = _images(2, 1, 32, 32, seed=10)
    pre_logits = grey.forward_head(grey.forward_features(x), pre_logits=True)
    assert (pre_logits - rgb(x.expand(-1, 3, -1, -1))).abs().max() < 1e-4
    assert grey(x).shape == (2, 5)


@torch.no_grad()
def test_load_with_other_patch_size_resamples_the_kernel(tmp_path):
    path = tmp_path / "ckpt.pth.tar"
    target = _depth1_checkpoint("flexpredict_vit_ti16", path)
    kwargs = dict(depth=1, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    p16 = timm.create_model("flexpredict_vit_ti16", img_size=16, **kwargs).eval()
    p32 = timm.create_model("flexpredict_vit_ti16", img_size=32, patch_size=32, **kwargs).eval()
    assert p32.patch_embed.proj.weight.shape == (192, 3, 32, 32)
    assert torch.equal(p32.patch_embed.proj.bias, target["patch_embed.proj.bias"])
    # timm's FlexiViT resampling: a patch upsampled as the kernel was gives the same token as the original patch.
    patch = _images(1, 3, 16, 16, seed=11)
    upsampled = torch.nn.functional.interpolate(patch, size=(32, 32), mode="bicubic", antialias=True)
    err = (p32.patch_embed(upsampled) - p16.patch_embed(patch)).abs().max().item()
    assert err < 1e-4, err
    p8 = timm.create_model("flexpredict_vit_ti16", img_size=64, patch_size=8, **kwargs).eval()
    assert p8.patch_embed.proj.weight.shape == (192, 3, 8, 8)
    assert p8(_images(1, 3, 64, 64)).shape == (1, 192)
