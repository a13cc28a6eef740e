"""Validation of a click model: AUC and log-loss from scikit-learn, over the whole set at once."""

from typing import Dict

import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate_clicks(model: nn.Module, loader: DataLoader) -> Dict[str, float]:
    probs, labels = [], []
    for dense, sparse, y in loader:
        probs.append(torch.sigmoid(model(dense, sparse)).double())
        labels.append(y)
    p, y = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    # AUC needs both classes; a tiny validation set may hold one: then it is undefined, not 0.5.
    auc = roc_auc_score(y, p) if 0 < y.sum() < len(y) else float("nan")
    return {"val/auc": float(auc), "val/logloss": float(log_loss(y, p, labels=[0, 1]))}
