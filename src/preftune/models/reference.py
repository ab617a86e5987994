"""How the reference model is held. One interface: ``ref.logps(batch) -> SequenceLogps`` for a batch of
stacked chosen/rejected rows; the training loop does not know which strategy is behind it.

``FrozenReference`` (``reference.mode=model``): a separate copy of the weights the user gave (or the
policy's starting checkpoint), in eval mode with gradients off. It is asserted to stay in eval mode at
every call: a reference left in train mode (dropout on) silently changes the loss.
"""

from __future__ import annotations

import torch

from preftune.models.logprobs import SequenceLogps, sequence_logps


class FrozenReference:
    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        assert not self.model.training, "the reference model must stay in eval mode"
        return sequence_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
