"""The chunked loss equals transformers' own loss, in value and in gradients."""

import pytest
import torch
import torch.nn.functional as F

from qlora_lite.ops.loss import IGNORE_INDEX, causal_lm_loss, chunked_cross_entropy


@pytest.mark.parametrize("chunk", [0, 1, 7, 1024])
def test_chunked_equals_plain_loss_and_grads(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, :4] = IGNORE_INDEX
    loss_sum, n = chunked_cross_entropy(hidden, weight, labels, chunk)
    (loss_sum / n).backward()
    ours = (loss_sum.detach() / n, hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    logits = (hidden @ weight.T)[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    ref.backward()
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours[0], ref.detach())
    torch.testing.assert_close(ours[1], hidden.grad)
    torch.testing.assert_close(ours[2], weight.grad)


def test_matches_transformers_model_loss(tiny_llama):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    x = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[:, :5] = IGNORE_INDEX
    ref = m(input_ids=x, labels=labels).loss
    s, n = causal_lm_loss(m, {"input_ids": x, "labels": labels}, chunk_size=4)
    torch.testing.assert_close(s / n, ref)


def test_no_trained_token_gives_zero_with_grad():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    s, n = chunked_cross_entropy(hidden, torch.randn(10, 8), torch.full((1, 4), IGNORE_INDEX))
    assert n == 0 and s.item() == 0.0 and s.requires_grad


@pytest.mark.parametrize("arch", ["phi", "gemma2", "granite"])
def test_models_that_shape_their_logits_get_their_own_loss(arch, tmp_path):
    """A head bias (Phi), soft-capping (Gemma-2) or logit scaling (Granite) is not hidden @ W.T:
    the loss must be the model's own, not the chunked shortcut's."""
    import transformers

    from qlora_lite.ops.loss import plain_linear_head

    cfg_cls, model_cls = {
        "phi": (transformers.PhiConfig, transformers.PhiForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
    }[arch]
    extra = {"logits_scaling": 8.0} if arch == "granite" else {}
    cfg = cfg_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    m = model_cls(cfg).float()
    assert not plain_linear_head(m)
    x = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = x.clone()
    labels[:, :3] = IGNORE_INDEX
    s, n = causal_lm_loss(m, {"input_ids": x, "labels": labels}, chunk_size=4)
    torch.testing.assert_close(s / n, m(input_ids=x, labels=labels).loss)


def test_llama_takes_the_chunked_path(tiny_llama):
    from transformers import AutoModelForCausalLM

    from qlora_lite.ops.loss import plain_linear_head

    assert plain_linear_head(AutoModelForCausalLM.from_pretrained(tiny_llama))
