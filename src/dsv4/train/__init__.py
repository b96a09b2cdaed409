"""Training: optimizers (Muon + AdamW) and schedules."""

from dsv4.train.optim import Muon, build_optimizer, orthogonalize, param_groups
from dsv4.train.schedule import WSDSchedule, mtp_weight

__all__ = ["Muon", "WSDSchedule", "build_optimizer", "mtp_weight", "orthogonalize", "param_groups"]
