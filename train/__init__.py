"""FlexPredict (StoP) pretraining, installed as `flexpredict_zoo.train`."""
