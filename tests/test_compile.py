"""torch.compile helpers: compile counts stay bounded while kept-token counts change, outputs equal eager."""
import copy
import math

import pytest
import timm
import torch
from torch import nn

import flexpredict_zoo  # noqa: F401
from flexpredict_zoo.train import StoPPredictor
from flexpredict_zoo.train.compile import CompileCounter, compile_module, reset_compiler


class _Masked(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images, masks):
        return self.encoder.forward_masked(images, masks)


def _tiny():
    torch.manual_seed(0)
    encoder = timm.create_model("flexpredict_vit_m4_32", depth=1, embed_dim=32, num_heads=2)
    predictor = StoPPredictor(num_patches=64, embed_dim=32, predictor_embed_dim=16, depth=1, num_heads=2)
    return _Masked(encoder), predictor


def _masks(step, batch=2):
    g = torch.Generator().manual_seed(step)
    kc, kt = 10 + (7 * step) % 25, 4 + (5 * step) % 11  # lengths change every step, as the collator's do
    context = torch.stack([torch.randperm(64, generator=g)[:kc] for _ in range(batch)])
    targets = [torch.stack([torch.randperm(64, generator=g)[:kt] for _ in range(batch)]) for _ in range(4)]
    return [context], targets


def test_dynamic_token_dims_compile_once_over_20_steps_and_match_eager():
    reset_compiler()
    encoder, predictor = _tiny()
    counter = CompileCounter("aot_eager")
    c_encoder = compile_module(encoder, counter, {1: 1})
    c_predictor = compile_module(predictor, counter, {0: 1, 1: 1, 2: 1, "noise": 1})
    images = torch.randn(2, 3, 32, 32)
    worst = 0.0
    for step in range(20):
        context_masks, target_masks = _masks(step)
        noise = torch.randn(8, target_masks[0].shape[1], 32, generator=torch.Generator().manual_seed(step))
        out = c_predictor(c_encoder(images, context_masks), context_masks, target_masks, noise=noise)
        ref = predictor(encoder(images, context_masks), context_masks, target_masks, noise=noise)
        out.square().mean().backward()
        worst = max(worst, (out - ref).abs().max().item())
        if step == 1:
            counter.mark_warm()
    assert counter.compiles <= 3  # one graph per network; the lengths never recompile
    assert counter.recompiles == 0
    assert worst < 1e-5
    assert all(p.grad is not None for p in encoder.parameters())


def test_counter_sees_recompilation_without_dynamic_marks():
    reset_compiler()
    encoder, _ = _tiny()
    counter = CompileCounter("aot_eager")
    c_encoder = compile_module(encoder, counter)  # no marks: Dynamo specialises on the first length
    images = torch.randn(2, 3, 32, 32)
    c_encoder(images, _masks(0)[0])
    counter.mark_warm()
    for step in range(1, 6):
        c_encoder(images, _masks(step)[0])
    # automatic dynamic shapes: exactly one recompilation (the length becomes symbolic), then none
    assert counter.compiles == 2 and counter.recompiles == 1
    assert counter.shapes[0] != counter.shapes[1]


@pytest.mark.slow
def test_inductor_matches_eager_with_varying_lengths():
    reset_compiler()
    encoder, _ = _tiny()
    counter = CompileCounter("inductor")
    c_encoder = compile_module(encoder, counter, {1: 1})
    images = torch.randn(2, 3, 32, 32)
    for step in range(6):
        context_masks, _ = _masks(step)
        out = c_encoder(images, context_masks)
        assert (out - encoder(images, context_masks)).abs().max().item() < 1e-5
    assert counter.compiles == 1


def test_compile_model_one_graph_per_network_and_no_recompiles_over_a_training_run():
    from flexpredict_zoo.train.compile import compile_model
    from flexpredict_zoo.train.model import StoPModel
    reset_compiler()
    encoder, predictor = _tiny()
    eager = StoPModel(encoder.encoder, predictor)
    model = copy.deepcopy(eager)
    counter = compile_model(model, CompileCounter("aot_eager"))
    images = torch.randn(2, 3, 32, 32)
    worst = 0.0
    for step in range(12):
        context_masks, target_masks = _masks(step)
        torch.manual_seed(step)
        loss = model(images, context_masks, target_masks)
        loss.backward()
        torch.manual_seed(step)
        reference = eager(images, context_masks, target_masks)
        reference.backward()
        worst = max(worst, abs(loss.item() - reference.item()))
        model.update_target(0.9)
        eager.update_target(0.9)
        if step == 1:
            counter.mark_warm()
    assert counter.compiles == 3  # target encoder, context encoder, predictor
    assert counter.recompiles == 0  # the lengths change every step
    assert worst < 1e-5
    grads = [(p.grad, q.grad) for p, q in zip(model.trained_parameters(), eager.trained_parameters())]
    assert all((g is None) == (h is None) for g, h in grads)  # only the official, unused mask_token has none
    assert sum(g is not None for g, _ in grads) == len(grads) - 1 > 10
    assert all(torch.allclose(g, h, atol=1e-5) for g, h in grads if g is not None)


def test_compile_modes_and_their_cuda_graphs():
    from flexpredict_zoo.train.config import COMPILE_MODES
    assert set(COMPILE_MODES) == {"default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"}
    assert [CompileCounter(mode=m).cudagraphs for m in (None, "default", "max-autotune-no-cudagraphs")] == [False] * 3
    assert CompileCounter(mode="reduce-overhead").cudagraphs and CompileCounter(mode="max-autotune").cudagraphs
    assert not CompileCounter("aot_eager", mode="reduce-overhead").cudagraphs  # only Inductor makes CUDA graphs


@pytest.mark.parametrize("overrides, message", [
    (["run.compile=true", "run.compile_mode=fast"], "'run.compile_mode' must be null or one of default, reduce-overhead"),
    (["run.compile_mode=reduce-overhead"], "set run.compile=true as well"),
])
def test_compile_mode_config_errors(overrides, message):
    from flexpredict_zoo.train.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", overrides)


@pytest.mark.slow
def test_trainer_with_a_cuda_graph_mode_marks_every_step(tmp_path, monkeypatch):
    # run.compile_mode=reduce-overhead through the trainer (Inductor; on CPU it compiles without CUDA graphs): each
    # train step tells the CUDA-graph trees that a new step begins, so a graph output of the previous step is not
    # read after the next replay overwrote it
    from conftest import TINY_TRAIN_OVERRIDES
    from flexpredict_zoo.train.config import load_config
    from flexpredict_zoo.train.engine import Trainer
    marks = []
    real = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: (marks.append(1), real())[1])
    reset_compiler()
    cfg = load_config("tiny_cpu", TINY_TRAIN_OVERRIDES + [f"run.output_dir={tmp_path}", "run.max_steps=3",
                                                          "run.compile=true", "run.compile_mode=reduce-overhead"])
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["iterations"] == 3 and len(marks) == 3
    assert trainer.compile_counter.mode == "reduce-overhead" and trainer.compile_counter.compiles == 3
    assert all(math.isfinite(loss) for loss in summary["losses"])
