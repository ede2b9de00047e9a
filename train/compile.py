"""torch.compile for the train step, with compile and recompile counts.

The number of kept tokens changes from batch to batch (the mask collator draws one context size and one target
size per batch), so a compiled encoder or predictor would by default specialise on the first batch's lengths and
recompile for the next ones. `compile_module` marks the token dimension of the mask tensors (and of any other
argument named in `dynamic_dims`) dynamic before each call, so one graph serves every length; nothing is padded,
so no attention masking is needed and the math is unchanged.

`CompileCounter` is a Dynamo backend that wraps the real one (inductor by default) and counts the graphs it is
asked to compile; graphs compiled after `mark_warm()` (called once the first steps ran) are recompilations.
Only public-ish, long-standing hooks are used (`torch._dynamo.lookup_backend`, `torch._dynamo.maybe_mark_dynamic`,
`torch._dynamo.utils.counters`), present in torch 2.4 through 2.14.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch

__all__ = ["CompileCounter", "CompiledCallable", "compile_module", "compile_model", "inductor_workarounds",
           "mark_tokens_dynamic", "dynamo_stats", "reset_compiler"]


class CompileCounter:
    """A Dynamo backend that counts graph compilations and hands each graph to `backend`.

    `compiles`: graphs compiled so far (every graph of every frame, including the pieces around graph breaks);
    `recompiles`: those compiled after `mark_warm()`; `shapes`: the example input shapes of each graph, to say
    what changed when something recompiled."""

    def __init__(self, backend: Union[str, Callable] = "inductor", mode: Optional[str] = None,
                 options: Optional[Dict[str, Any]] = None):
        self.backend = backend
        self.mode = mode
        self.options = dict(options or {})
        self.compiles = 0
        self.warm_at: Optional[int] = None
        self.shapes: list = []

    @functools.cached_property
    def cudagraphs(self) -> bool:
        """Whether the compiled graphs are run as CUDA graphs (modes reduce-overhead and max-autotune); read by
        every train step, so worked out once."""
        if self.backend != "inductor":
            return False
        from torch._inductor import list_mode_options
        options = dict(list_mode_options(self.mode) if self.mode else {}, **self.options)
        return bool(options.get("triton.cudagraphs", False))

    @property
    def recompiles(self) -> int:
        return 0 if self.warm_at is None else self.compiles - self.warm_at

    def mark_warm(self) -> None:
        """From now on every compiled graph counts as a recompilation."""
        self.warm_at = self.compiles

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        self.compiles += 1
        self.shapes.append([tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                            for x in example_inputs])
        if callable(self.backend):
            return self.backend(gm, example_inputs)
        if self.backend == "inductor":
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx
            patches = dict(inductor_workarounds(), **(list_mode_options(self.mode) if self.mode else {}))
            patches.update(self.options)
            return compile_fx(gm, example_inputs, config_patches=patches)
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)

    def summary(self) -> Dict[str, int]:
        return {"compiles": self.compiles, "recompiles": self.recompiles}


def inductor_workarounds() -> Dict[str, Any]:
    """Inductor settings the train step needs on the torch versions that have them.

    `triton.mix_order_reduction` (on by default in torch 2.11) fuses a row reduction with a column reduction
    through a workspace sized for the first shapes it saw; with our dynamic token dimension the compiled backward
    of the predictor then fails on an H200 with `RuntimeError: shape '[1408, 384]' is invalid for input of size
    832` (benchmarks/gpu_check.py, torch 2.11.0+cu130). With it off the same run trains with 0 recompiles."""
    import torch._inductor.config as inductor_config
    triton_config = getattr(inductor_config, "triton", None)
    return {"triton.mix_order_reduction": False} if hasattr(triton_config, "mix_order_reduction") else {}


def mark_tokens_dynamic(value: Any, dim: int = 1) -> None:
    """Mark dimension `dim` of a tensor (or of every tensor in a list/tuple) as dynamic for the next compiled call.
    `maybe_mark_dynamic`: if the code does specialise on the length, Dynamo recompiles instead of raising."""
    if isinstance(value, torch.Tensor):
        if value.dim() > dim:
            torch._dynamo.maybe_mark_dynamic(value, dim)
    elif isinstance(value, (list, tuple)):
        for item in value:
            mark_tokens_dynamic(item, dim)


class CompiledCallable:
    """A compiled module (or method) plus the eager one; marks the token dimensions dynamic before each call.

    `dynamic_dims` maps a positional index or keyword name to the dimension to mark: for the context encoder
    `forward(images, masks)` that is {1: 1} (masks (B, K)); for the predictor `forward(context_tokens,
    context_masks, target_masks, noise)` it is {0: 1, 1: 1, 2: 1, "noise": 1}."""

    def __init__(self, module: Callable, compiled: Callable, dynamic_dims: Dict[Union[int, str], int]):
        self.module = module
        self.compiled = compiled
        self.dynamic_dims = dict(dynamic_dims)

    def __call__(self, *args: Any, **kwargs: Any):
        for key, dim in self.dynamic_dims.items():
            if isinstance(key, int) and key < len(args):
                mark_tokens_dynamic(args[key], dim)
            elif isinstance(key, str) and kwargs.get(key) is not None:
                mark_tokens_dynamic(kwargs[key], dim)
        return self.compiled(*args, **kwargs)

    # callers may treat it as the module (parameters, train/eval, state dicts)
    def __getattr__(self, name: str):
        return getattr(self.module, name)


def compile_module(module: Callable, counter: Optional[CompileCounter] = None,
                   dynamic_dims: Optional[Dict[Union[int, str], int]] = None, fullgraph: bool = False
                   ) -> CompiledCallable:
    """torch.compile(module) through `counter` (a CompileCounter, created if None), with token dims marked dynamic.
    dynamic=None keeps Dynamo's automatic dynamic shapes for anything not marked (e.g. a batch that lost an
    unreadable image recompiles once with a dynamic batch, then never again)."""
    counter = counter if counter is not None else CompileCounter()
    compiled = torch.compile(module, backend=counter, dynamic=None, fullgraph=fullgraph)
    return CompiledCallable(module, compiled, dynamic_dims or {})


def dynamo_stats() -> Dict[str, int]:
    """Dynamo's own counters: unique graphs, graph breaks (by reason, summed), frames that recompiled."""
    from torch._dynamo.utils import counters
    return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "calls_captured": int(counters["stats"].get("calls_captured", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def reset_compiler() -> None:
    """Forget compiled code and counters (between independent benchmarks in one process)."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()


def compile_model(model: Any, counter: Optional[CompileCounter] = None) -> CompileCounter:
    """Compile the three network calls of a model.StoPModel in place, through one CompileCounter.

    `encode_context(images, context_masks)`: the masks' token dim dynamic; `predict(context, context_masks,
    target_masks)`: every token dim dynamic; `encode_targets(images)`: all tokens, static shapes. The compiled
    versions shadow the methods on the instance, so `model(...)` (through DDP or not) runs them; parameters are read
    at call time, so the optimizer and EMA updates are seen by the compiled graphs. engine.Trainer calls this when
    run.compile is set."""
    counter = counter if counter is not None else CompileCounter()
    model.encode_context = compile_module(model.context_encoder.forward_masked, counter, {1: 1})
    model.predict = compile_module(model.predictor, counter, {0: 1, 1: 1, 2: 1, "noise": 1})
    model.encode_targets = torch.compile(model.encode_targets, backend=counter, dynamic=None)
    return counter
