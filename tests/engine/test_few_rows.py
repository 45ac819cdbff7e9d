"""FewRowsLinear: the same products as nn.Linear for any number of rows, contiguous, and a model
converted in place keeps its parameters, tied weights and outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.engine.few_rows import FewRowsLinear, use_few_rows_linears
from app.engine.tiny import build_tiny


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(0, 24), (1, 24), (2, 24), (3, 24), (2, 1, 24), (3, 1, 24),
                                   (4, 24), (2, 5, 24)])
def test_the_same_product_as_linear(bias, shape):
    torch.manual_seed(0)
    plain = nn.Linear(24, 40, bias=bias)
    few = nn.Linear(24, 40, bias=bias)
    few.load_state_dict(plain.state_dict())
    few.__class__ = FewRowsLinear
    x = torch.randn(*shape)
    out = few(x)
    assert out.shape == (*shape[:-1], 40) and out.is_contiguous()
    torch.testing.assert_close(out, plain(x), atol=1e-6, rtol=1e-6)


def test_a_converted_model_keeps_its_weights_and_outputs():
    lm = build_tiny("tiny-llama")  # LanguageModel converts its model's linears
    model = lm.hf_model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is FewRowsLinear for m in linears)
    assert use_few_rows_linears(model) == 0  # nothing left to convert
    ids = torch.tensor([lm.tokenize("def add(a, b):")] * 2)
    with torch.no_grad():
        converted = model(input_ids=ids).logits
        for m in linears:
            m.__class__ = nn.Linear
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(converted, plain, atol=1e-5, rtol=1e-5)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert (head.weight is embeddings.weight) == bool(model.config.tie_word_embeddings)
