"""The paper's six models in dm-haiku, with their losses and dataset specs."""

from models.registry import (DATASETS, MODEL_NAMES, MODELS, DatasetSpec, LossFn, Model,
                             count_params, get_model)

__all__ = ["DATASETS", "MODEL_NAMES", "MODELS", "DatasetSpec", "LossFn", "Model",
           "count_params", "get_model"]
