"""Drop-in optimizers on fastcnn's fused update ops: Adam, AdamW, SGD and Adagrad (torch.optim's arguments, results
and state_dict layout), LARS, and the large-batch learning-rate schedule."""
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .lars import LARS, exclude_bias_and_norm
from .schedules import warmup_polynomial_decay, warmup_polynomial_factor
from .sgd import SGD

__all__ = ["LARS", "SGD", "Adagrad", "Adam", "AdamW", "exclude_bias_and_norm", "warmup_polynomial_decay",
           "warmup_polynomial_factor"]
