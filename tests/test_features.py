"""Feature extraction: row order, exact values against the model, skipped files, workers, file round trip, CLI."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from torchvision import transforms

import flexpredict_zoo  # noqa: F401  (registers the models)
from flexpredict_zoo.features import (IMAGE_EXTENSIONS, FeatureResult, add_extract_arguments, eval_transform,
                                      extract_features, find_images, load_features, model_eval_transform,
                                      run_extract, save_features)
from flexpredict_zoo.manifest import UnknownModelError

TINY = dict(depth=2, img_size=64)
GOOD = ["a.png", "b.jpg", "sub/c.jpeg", "sub/deeper/d.PNG"]
BAD = ["notes.jpg", "sub/broken.png", "truncated.jpg"]


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("flexpredict_vit_ti16", pretrained=False, **TINY).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, name in enumerate(GOOD):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # Different sizes and aspect ratios so the resize + centre crop really runs.
        array = rng.integers(0, 256, size=(70 + 10 * i, 90 - 5 * i, 3), dtype=np.uint8)
        Image.fromarray(array).save(path, format="PNG" if name.lower().endswith("png") else "JPEG")
    (root / "notes.jpg").write_text("not an image")
    (root / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    jpeg = (root / "b.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "readme.txt").write_text("ignored: not an image extension")
    return root


def _reference_transform(size: int):
    """The official evaluation preprocessing, built by hand: short side to `size`, centre crop, ImageNet stats."""
    return transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
                               transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def _reference_pooled(model, path) -> torch.Tensor:
    with torch.inference_mode():
        return model(_reference_transform(64)(Image.open(path).convert("RGB")).unsqueeze(0))[0]


def _blocks_by_hand(model, images):
    """Every block's output run by hand (patch_embed, fixed position embedding, blocks), and the final norm."""
    x = model.patch_embed(images) + model.pos_embed
    outputs = []
    for block in model.blocks:
        x = block(x)
        outputs.append(x)
    return outputs, model.norm


def test_eval_transform_is_the_official_one(image_dir):
    transform, input_size = model_eval_transform(timm.create_model("flexpredict_vit_ti16", img_size=64))
    assert input_size == (3, 64, 64)
    for name in GOOD:
        image = Image.open(image_dir / name).convert("RGB")
        torch.testing.assert_close(transform(image), _reference_transform(64)(image), atol=0, rtol=0)
    # the training package uses this same transform and image-extension list
    from flexpredict_zoo.train import data
    assert data.eval_transform is eval_transform and data.IMG_EXTENSIONS is IMAGE_EXTENSIONS


def test_folder_names_rows_and_values(model, image_dir):
    result = extract_features(model, image_dir, batch_size=3, device="cpu")
    assert result.names == sorted(GOOD, key=lambda n: n)  # relative to the folder, sorted
    assert result.pooled.shape == (len(GOOD), model.num_features) and result.pooled.dtype == torch.float32
    assert result.input_size == (3, 64, 64) and result.dtype == "float32"
    for row, name in enumerate(result.names):
        torch.testing.assert_close(result.pooled[row], _reference_pooled(model, image_dir / name), atol=1e-5, rtol=0)
    # Rows are distinct images, not one repeated.
    assert torch.cdist(result.pooled, result.pooled).fill_diagonal_(1.0).min() > 1e-3
    assert model.training is False


def test_unreadable_files_are_reported_with_reasons(model, image_dir, caplog):
    result = extract_features(model, image_dir, batch_size=2, device="cpu")
    skipped = dict(result.skipped)
    assert sorted(skipped) == sorted(BAD)
    assert "truncated" in skipped["truncated.jpg"]
    assert "cannot identify image" in skipped["notes.jpg"]
    assert not set(skipped) & set(result.names)
    assert len(result.names) + len(result.skipped) == len(find_images(image_dir))
    logged = caplog.text
    assert all(name in logged for name in BAD)


def test_patch_tokens_and_intermediates(model, image_dir):
    result = extract_features(model, image_dir, batch_size=4, device="cpu", patch_tokens=True, layers=[0, -1])
    n, grid = len(GOOD), (64 // 16) ** 2
    assert result.patch_tokens.shape == (n, grid, model.embed_dim)
    assert sorted(result.intermediates) == [0, 1]  # -1 stored as depth - 1
    assert result.intermediates[0].shape == (n, model.embed_dim)
    assert result.intermediate_tokens[1].shape == (n, grid, model.embed_dim)

    batch = torch.stack([_reference_transform(64)(Image.open(image_dir / name).convert("RGB"))
                         for name in result.names])
    with torch.inference_mode():
        blocks, norm = _blocks_by_hand(model, batch)
        normed_blocks = [norm(b) for b in blocks]
    expected_tokens = normed_blocks[-1]
    torch.testing.assert_close(result.patch_tokens, expected_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.pooled, expected_tokens.mean(dim=1), atol=1e-5, rtol=0)
    for layer in (0, 1):  # "layers" are block outputs through the final norm (the paper's last-4 probe)
        normed = normed_blocks[layer]
        torch.testing.assert_close(result.intermediate_tokens[layer], normed, atol=1e-5, rtol=0)
        torch.testing.assert_close(result.intermediates[layer], normed.mean(dim=1), atol=1e-5, rtol=0)
    assert (result.intermediates[0] - result.pooled).abs().max() > 1e-2  # block 0 is not the last block
    # so the last block's entry is the pooled output itself
    torch.testing.assert_close(result.intermediates[1], result.pooled, atol=1e-5, rtol=0)


def test_dataset_of_image_label_items(model, image_dir, caplog):
    """A Dataset of (PIL image or tensor, label) items, with an unreadable one: rows, labels and the skip."""
    from flexpredict_zoo.features import UnreadableImage, read_image

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            if i == 2:
                return UnreadableImage("bad.jpg", "OSError: truncated")
            image = read_image(image_dir / GOOD[i])
            return (image if i != 3 else _reference_transform(64)(image)), 10 + i

    result = extract_features(model, Items(), batch_size=3, device="cpu")
    assert result.names == ["0", "1", "3"] and result.labels.tolist() == [10, 11, 13]
    assert result.skipped == [("bad.jpg", "OSError: truncated")]
    assert caplog.text.count("skipped unreadable image bad.jpg: OSError: truncated") == 1
    for row, i in enumerate((0, 1, 3)):
        torch.testing.assert_close(result.pooled[row], _reference_pooled(model, image_dir / GOOD[i]), atol=1e-5, rtol=0)


def test_workers_give_the_same_result(model, image_dir):
    serial = extract_features(model, image_dir, batch_size=2, device="cpu", num_workers=0)
    parallel = extract_features(model, image_dir, batch_size=2, device="cpu", num_workers=2)
    assert parallel.names == serial.names and parallel.skipped == serial.skipped
    torch.testing.assert_close(parallel.pooled, serial.pooled, atol=0, rtol=0)


def test_list_inputs_keep_the_given_order_and_names(model, image_dir):
    inputs = [str(image_dir / "sub"), str(image_dir / "b.jpg"), str(image_dir / "a.png")]
    result = extract_features(model, inputs, device="cpu")
    sub = str(image_dir / "sub")
    assert result.names == [f"{sub}/c.jpeg", f"{sub}/deeper/d.PNG", inputs[1], inputs[2]]
    assert result.skipped[0][0] == f"{sub}/broken.png"
    single = extract_features(model, image_dir / "b.jpg", device="cpu")
    assert single.names == [str(image_dir / "b.jpg")]
    torch.testing.assert_close(single.pooled[0], result.pooled[2], atol=1e-6, rtol=0)


def test_model_by_name(image_dir):
    result = extract_features("flexpredict_vit_m4_32", image_dir / "a.png", pretrained=False, device="cpu",
                              model_kwargs=dict(depth=1))
    assert result.pooled.shape == (1, 128) and result.input_size == (3, 32, 32)
    assert result.model_name == "flexpredict_vit_m4_32"


def test_errors_say_what_to_do(model, tmp_path, image_dir):
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    (tmp_path / "empty" / "nested" / "x.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found in folder"):
        extract_features(model, tmp_path / "empty", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract_features(model, tmp_path / "missing", device="cpu")
    with pytest.raises(ValueError, match="none of the 1 images could be read"):
        extract_features(model, [image_dir / "notes.jpg"], device="cpu")
    with pytest.raises(UnknownModelError, match="Did you mean flexpredict_vit_b16"):
        extract_features("flexpredict_vit_b61", image_dir, pretrained=False, device="cpu")
    with pytest.raises(ValueError, match="out of range: the model has 2 blocks"):
        extract_features(model, image_dir, device="cpu", layers=[2])


def test_save_load_round_trip(model, image_dir, tmp_path):
    result = extract_features(model, image_dir, device="cpu", patch_tokens=True, layers=[1])
    path = save_features(result, tmp_path / "new" / "feats.safetensors", {"note": "x", "run": 3})
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["feats.safetensors"]  # no temp left
    loaded = load_features(path)
    assert isinstance(loaded, FeatureResult)
    assert loaded.names == result.names and loaded.skipped == result.skipped
    assert loaded.input_size == (3, 64, 64) and loaded.model_name == result.model_name
    for a, b in [(loaded.pooled, result.pooled), (loaded.patch_tokens, result.patch_tokens),
                 (loaded.intermediates[1], result.intermediates[1]),
                 (loaded.intermediate_tokens[1], result.intermediate_tokens[1])]:
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert loaded.metadata["note"] == "x" and json.loads(loaded.metadata["run"]) == 3
    assert loaded.metadata["torch_version"] == torch.__version__
    assert loaded.metadata["timm_version"] == timm.__version__
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        (tmp_path / "junk.safetensors").write_bytes(b"junk")
        load_features(tmp_path / "junk.safetensors")


def _parse(*argv: str) -> argparse.Namespace:
    return add_extract_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_run_extract_writes_file_with_metadata(image_dir, tmp_path, capsys):
    out = tmp_path / "made" / "features.safetensors"
    args = _parse("flexpredict_vit_m4_32", str(image_dir), "--out", str(out), "--no-pretrained",
                  "--batch-size", "2", "--workers", "0", "--device", "cpu", "--layers", "3")
    assert run_extract(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert all(f"skipped unreadable image {name}" in captured.err for name in BAD)  # beside the progress bar
    assert f"read {len(GOOD)} images, skipped {len(BAD)}" in printed and str(out) in printed
    assert all(name in printed for name in BAD)
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
        assert sorted(handle.keys()) == ["layer_3", "pooled"]
        assert tuple(handle.get_tensor("pooled").shape) == (len(GOOD), 128)
    assert json.loads(meta["names"]) == sorted(GOOD)
    assert sorted(item["path"] for item in json.loads(meta["skipped"])) == sorted(BAD)
    assert meta["model"] == "flexpredict_vit_m4_32" and json.loads(meta["image_size"]) == [3, 32, 32]
    assert meta["dtype"] == "float32" and meta["weights"] == "none"
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_extract(args)
    with pytest.raises(ValueError, match="contradict"):
        run_extract(_parse("flexpredict_vit_m4_32", str(image_dir), "--out", str(tmp_path / "y.safetensors"),
                           "--no-pretrained", "--checkpoint", str(out)))


def test_run_extract_on_a_training_run_folder(image_dir, tmp_path, capsys):
    """`flexpredict-zoo extract RUN_DIR ...`: the one loader takes run folders; the features are the run's EMA
    target encoder's (`--encoder context` the other one)."""
    from conftest import reference_encoder, write_run
    run_dir = write_run(tmp_path / "run")
    for encoder, key in (("target", "target_encoder"), ("context", "encoder")):
        out = tmp_path / f"{encoder}.safetensors"
        assert run_extract(_parse(str(run_dir), str(image_dir / "a.png"), "--out", str(out), "--workers", "0",
                                  "--device", "cpu", "--no-progress", "--encoder", encoder)) == 0
        expected = reference_encoder(run_dir, key)
        with torch.inference_mode():
            reference = expected(_reference_transform(32)(Image.open(image_dir / "a.png").convert("RGB"))[None])
        loaded = load_features(out)
        torch.testing.assert_close(loaded.pooled, reference, atol=1e-5, rtol=0)
        assert loaded.model_name == "flexpredict_vit_m4_32 (run)"
