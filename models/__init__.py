"""The paper's six models in dm-haiku (and a transformer and a ViT beyond it), with their
losses and dataset specs; ``models.custom`` loads your own."""

from models.registry import (DATASETS, MODEL_NAMES, MODELS, PAPER_MODEL_NAMES, DatasetSpec,
                             LossFn, Model, count_params, get_model)

__all__ = ["DATASETS", "MODEL_NAMES", "MODELS", "PAPER_MODEL_NAMES", "DatasetSpec", "LossFn",
           "Model", "count_params", "get_model"]
