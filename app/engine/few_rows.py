"""Linear layers that multiply two or three rows as ``W @ x.T``: decoding feeds one token per
stream, and the CPU BLAS runs ``x @ W.T`` for two or three rows far slower than for one.

``torch.nn.functional.linear`` with 2-3 rows takes the BLAS's general matrix product: measured
here, a smollm2-135m decode step of a batch of two cost 1.8x one stream's CPU time on one thread
(the 49k-row unembedding alone 2.5x, and up to 4.7x on two threads), so default beside steered
ran at 2.6x one stream. The same sums taken as ``W @ x.T`` (the shape text search's SAE
encode takes too, see ``SAE.hidden_pre``) cost what one row does: the batch of two's step then
cost 0.9-1.0x one stream's. One row, and four rows or more, keep the plain product (as fast or
faster there).
The result is made contiguous: attention's fast CPU kernel needs its inputs' last dimension
contiguous, and falls back to a slower one otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FEW_ROWS = range(2, 4)


class FewRowsLinear(nn.Linear):
    """``nn.Linear`` with the product taken as ``(W @ x.T).T`` for 2 or 3 rows (``FEW_ROWS``);
    the same parameters, state dict and hooks."""

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] not in FEW_ROWS:
            return super().forward(x)
        if self.bias is None:
            out = torch.mm(self.weight, flat.t())
        else:
            out = torch.addmm(self.bias[:, None], self.weight, flat.t())
        return out.t().contiguous().reshape(*x.shape[:-1], self.weight.shape[0])


def use_few_rows_linears(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a ``FewRowsLinear`` in place (its class
    only: parameters, tied weights and hooks stay); how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FewRowsLinear
            changed += 1
    return changed
