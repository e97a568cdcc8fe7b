"""The optimizer a run trains with: AdamW, or Muon for the blocks' matrices and AdamW for the
rest (train.optimizer). torch's own implementations of both do the arithmetic."""

import torch


class Chained(torch.optim.Optimizer):
    """Several optimizers, each over its own parameters, seen as one: one param_groups list and
    one state shared with them, so that the learning rate schedule, gradient clipping,
    GradScaler, state_dict and torch.distributed.checkpoint treat it as any optimizer."""

    def __init__(self, optimizers):
        super().__init__([group for o in optimizers for group in o.param_groups], {})
        self.optimizers = optimizers
        self._share()

    def _share(self):
        groups = iter(self.param_groups)
        for o in self.optimizers:
            o.param_groups = [next(groups) for _ in o.param_groups]
            o.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure else None
        for o in self.optimizers:
            o.step()
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # new group dicts and a new state: share them again
        self._share()


def make_optimizer(model, t):
    """AdamW with weight decay on matrices only (not on biases, norms' gains). With
    t.optimizer == "muon", the matrices inside the blocks go to Muon instead (its step scaled to
    AdamW's size, so one learning rate serves both); the embedding, tied to the output head, stays
    with AdamW, as Muon's authors advise."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    muon = [p for name, p in named if t.optimizer == "muon" and p.dim() == 2 and ".blocks." in f".{name}"]
    chosen = {id(p) for p in muon}
    rest = [p for _, p in named if id(p) not in chosen]
    adamw = torch.optim.AdamW([
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ], lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
    if not muon:
        return adamw
    return Chained([adamw, torch.optim.Muon(muon, lr=t.lr, weight_decay=t.weight_decay,
                                            adjust_lr_fn="match_rms_adamw")])
