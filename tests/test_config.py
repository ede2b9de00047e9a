"""train/config.py: typed sections, unknown-key errors naming the valid keys, typed overrides, shipped recipes."""
import pytest
import yaml

from flexpredict_zoo.train.config import ConfigError, TrainConfig, from_dict, load_config, parse_override


def test_unknown_key_names_valid_keys_and_close_match():
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", ["optim.lr_peek=1e-3"])
    msg = str(e.value)
    assert "optim.lr_peek" in msg and "Did you mean 'optim.lr_peak'" in msg
    for key in ("lr_start", "lr_final", "warmup_epochs", "ema_end"):  # valid keys are listed
        assert key in msg


def test_unknown_section_and_bad_types():
    with pytest.raises(ConfigError, match="Valid keys: model, predictor, mask, data, optim, run"):
        from_dict({"optimizer": {"epochs": 1}})
    with pytest.raises(ConfigError, match="'data.batch_size' must be an integer"):
        load_config("tiny_cpu", ["data.batch_size=eight"])
    with pytest.raises(ConfigError, match="'mask.target_scale' must be a list of 2"):
        load_config("tiny_cpu", ["mask.target_scale=0.2"])
    with pytest.raises(ConfigError, match="run.precision"):
        load_config("tiny_cpu", ["run.precision=fp8"])
    with pytest.raises(ConfigError, match="data.root"):
        load_config("vit_b16")  # the ImageNet folder must be given


def test_overrides_are_typed():
    cfg = load_config("tiny_cpu", ["optim.lr_peak=1e-3", "optim.warmup_epochs=2", "mask.target_scale=[0.1, 0.3]",
                                   "optim.clip_grad=1.5", "run.max_steps=null", "data.hflip=false",
                                   "model.kwargs={depth: 2}", "run.resume=runs/x/latest.pt"])
    assert cfg.optim.lr_peak == 0.001 and isinstance(cfg.optim.lr_peak, float)  # YAML reads 1e-3 as a string
    assert cfg.optim.warmup_epochs == 2.0 and isinstance(cfg.optim.warmup_epochs, float)
    assert cfg.mask.target_scale == (0.1, 0.3)
    assert cfg.optim.clip_grad == 1.5 and cfg.run.max_steps is None and cfg.data.hflip is False
    assert cfg.model.kwargs == {"depth": 2} and cfg.run.resume == "runs/x/latest.pt"
    assert parse_override("a.b.c= [1, 2]") == (["a", "b", "c"], [1, 2])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("optim.lr_peak")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("digits_m4_32", ["optim.epochs=3"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.optim.epochs == 3
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["mask"]["target_scale"] == [0.15, 0.2]


@pytest.mark.parametrize("name, model, depth, sigma, epochs, lr, warmup, constant", [
    ("vit_b16", "flexpredict_vit_b16", 6, 0.25, 600, (2e-4, 8e-4, 1e-4), 15, None),
    ("vit_l16", "flexpredict_vit_l16", 12, 0.25, 600, (2e-4, 8e-4, 1e-4), 15, None),
    ("vit_h16", "flexpredict_vit_h16", 12, 0.20, 300, (2e-4, 1e-3, 1e-6), 40, 250),
])
def test_official_recipes(name, model, depth, sigma, epochs, lr, warmup, constant):
    cfg = load_config(name, ["data.root=/data/imagenet"])
    assert cfg.model.name == model and cfg.model.img_size == 224
    assert (cfg.predictor.depth, cfg.predictor.embed_dim, cfg.predictor.noise_std) == (depth, 384, sigma)
    assert cfg.predictor.num_heads is None  # = encoder heads
    o = cfg.optim
    assert (o.epochs, (o.lr_start, o.lr_peak, o.lr_final), o.warmup_epochs, o.constant_from_epoch) == \
        (epochs, lr, warmup, constant)
    assert (o.wd_start, o.wd_final, o.ema_start, o.ema_end, o.ipe_scale) == (0.04, 0.4, 0.996, 1.0, 1.0)
    d = cfg.data
    assert d.batch_size * 32 == 2048 and d.crop_scale == (0.3, 1.0) and d.hflip
    assert (d.grayscale_p, d.blur_p, d.blur_radius, d.color_jitter) == (0.2, 0.5, (0.1, 2.0), 0.0)
    m = cfg.mask
    assert (m.num_targets, m.target_scale, m.target_aspect, m.context_scale, m.context_aspect, m.min_keep) == \
        (4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), (1.0, 1.0), 10)
    assert cfg.run.precision == "auto"


def test_defaults_are_the_b16_recipe():
    d = TrainConfig()
    assert (d.optim.lr_start, d.optim.lr_peak, d.optim.lr_final, d.predictor.noise_std) == (2e-4, 8e-4, 1e-4, 0.25)


@pytest.mark.parametrize("override, key", [("optim.lr_peak=nan", "optim.lr_peak"), ("optim.lr_peak=.nan", "optim.lr_peak"),
                                           ("optim.clip_grad=.inf", "optim.clip_grad"),
                                           ("predictor.noise_std=-.inf", "predictor.noise_std"),
                                           ("mask.target_scale=[0.15,.nan]", "mask.target_scale")])
def test_non_finite_numbers_are_refused(override, key):
    # NaN passes every bound check (all comparisons with it are False): it needs a check of its own.
    with pytest.raises(ConfigError, match=f"'{key}' must be a finite number"):
        load_config("tiny_cpu", [override])
