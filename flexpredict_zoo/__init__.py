"""FlexPredict Zoo: FlexPredict (StoP) ViT backbones for timm, with the released weights.

Importing this package registers the models with timm:

    import timm, flexpredict_zoo
    model = timm.create_model("flexpredict_vit_b16", pretrained=True)
"""
from .checkpoints import CheckpointError, CheckpointMismatchError, ChecksumError
from .hub import WeightsNotAvailableError
from .manifest import UnknownModelError, model_names
from .vision_transformer import FlexPredictViT, checkpoint_filter_fn

__version__ = "0.1.0"
__all__ = ["FlexPredictViT", "checkpoint_filter_fn", "model_names", "CheckpointError", "CheckpointMismatchError",
           "ChecksumError", "WeightsNotAvailableError", "UnknownModelError", "__version__"]
