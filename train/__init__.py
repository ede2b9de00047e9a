"""FlexPredict (StoP) pretraining, installed as `flexpredict_zoo.train`."""

from .masks import MaskConfig, MaskSamplingError, MultiBlockMaskCollator
from .predictor import StoPPredictor
