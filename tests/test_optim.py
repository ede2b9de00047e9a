"""train/optim.py: the official AdamW parameter groups."""
import timm
import torch

import flexpredict_zoo  # noqa: F401
from flexpredict_zoo.train.config import OptimConfig
from flexpredict_zoo.train.optim import build_optimizer, set_hyperparameters
from flexpredict_zoo.train.predictor import StoPPredictor


def test_groups_and_weight_decay_only_on_matrices():
    enc = timm.create_model("flexpredict_vit_m4_32", depth=1, embed_dim=32, num_heads=2)
    pred = StoPPredictor(num_patches=64, embed_dim=32, predictor_embed_dim=16, depth=1, num_heads=2)
    opt = build_optimizer([enc, pred], OptimConfig(), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    names = {id(p): n for m, tag in ((enc, "enc"), (pred, "pred")) for n, p in m.named_parameters()}
    assert all(p.ndim >= 2 and "bias" not in names[id(p)] for p in decay["params"])
    assert all(p.ndim == 1 or "bias" in names[id(p)] for p in no_decay["params"])
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(pred.predictor_pos_embed) not in grouped  # frozen: never optimised, never decayed
    trainable = [p for m in (enc, pred) for p in m.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) == len(decay["params"]) + len(no_decay["params"])
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")  # CPU: foreach
    set_hyperparameters(opt, lr=1e-3, weight_decay=0.3)
    assert (decay["lr"], decay["weight_decay"], no_decay["lr"], no_decay["weight_decay"]) == (1e-3, 0.3, 1e-3, 0.0)
