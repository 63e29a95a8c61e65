"""Typed settings for each step. The CLI builds its flags from these fields, so a field's
name is its flag (`--train_batch_size`, also spelled `--train-batch-size`) and its help
text lives here, next to its default. train.py holds `raybooth train`'s, commands.py the
other commands', fields.py what they share."""


from raybooth.config.commands import (RUN_DERIVED_TRAIN_FIELDS, CacheConfig, GenerateConfig, MergeLoraConfig,
                                      RunConfig, TinyModelConfig)
from raybooth.config.fields import DTYPES, FULL_DEFAULT_LR, LORA_DEFAULT_LR, LORA_DEFAULT_RANK, PRECISIONS, option
from raybooth.config.train import TrainConfig

__all__ = ["DTYPES", "FULL_DEFAULT_LR", "LORA_DEFAULT_LR", "LORA_DEFAULT_RANK", "PRECISIONS",
           "RUN_DERIVED_TRAIN_FIELDS", "CacheConfig", "GenerateConfig", "MergeLoraConfig", "RunConfig",
           "TinyModelConfig", "TrainConfig", "option"]
