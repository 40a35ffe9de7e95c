"""The transformers route (sparsec.integrations.transformers): tiny randomly initialised Llama and
Mistral models built from configs (nothing downloaded). Under sparsec's attention they must equal
the same model under dense float64 attention with the same pattern and the key padding, on every
real token of a left-padded batch, in training (gradients) and through generate()."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsec import reference  # noqa: E402
from sparsec.integrations.transformers import register  # noqa: E402
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

PATTERN = "pattern p = causal & (band(5) + global(2))"
SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, attention_dropout=0.0)
MODELS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}


def _dense_reference(kern):
    """Dense float64 masked attention under kern.mask and the key padding: the route's oracle."""
    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        n_q, n_k = query.shape[2], key.shape[2]
        mask = kern.mask(n_q, n_k, heads=query.shape[1])
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -n_k:].bool()
        o, _ = reference.attention(query, key, value, mask, scaling)
        return o.to(query.dtype).transpose(1, 2).contiguous(), None
    return forward


@pytest.fixture(scope="module")
def routes():
    kern = register("sparsec_test", PATTERN)
    AttentionInterface.register("sparsec_dense_reference", _dense_reference(kern))
    AttentionMaskInterface.register("sparsec_dense_reference", AttentionMaskInterface._global_mapping["sparsec_test"])
    return kern


def _model(kind: str, attn: str, seed: int = 0):
    config_type, model_type = MODELS[kind]
    torch.manual_seed(seed)
    extra = {"sliding_window": None} if kind == "mistral" else {}   # the pattern is the window (module doc)
    model = model_type(config_type(**SIZES, **extra)).eval()
    model.set_attn_implementation(attn)
    return model


def _batch(gen):
    ids = torch.randint(0, 97, (3, 29), generator=gen)
    mask = torch.ones(3, 29, dtype=torch.long)
    mask[1, :9] = 0    # left padding
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("kind", MODELS)
def test_padded_batch_forward_and_gradients_match_dense(routes, kind):
    gen = torch.Generator().manual_seed(1)
    ids, mask = _batch(gen)
    real = mask.bool()
    outs = {}
    for attn in ("sparsec_test", "sparsec_dense_reference"):
        model = _model(kind, attn)
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = logits[real].logsumexp(-1).sum()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        outs[attn] = (logits[real].detach(), grads)
    (got, got_grads), (want, want_grads) = outs["sparsec_test"], outs["sparsec_dense_reference"]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("kind", MODELS)
def test_generate_with_the_kv_cache_matches_dense(routes, kind):
    """Greedy decoding: prefill then one token at a time from the model's cache (q_offset from it)."""
    gen = torch.Generator().manual_seed(2)
    ids, mask = _batch(gen)
    runs = [_model(kind, attn).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                        output_scores=True, return_dict_in_generate=True)
            for attn in ("sparsec_test", "sparsec_dense_reference")]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for got, want in zip(runs[0].scores, runs[1].scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_output_attentions_is_a_clear_error(routes):
    model = _model("llama", "sparsec_test")
    with pytest.raises(ValueError, match="output_attentions=True: sparsec never forms the attention matrix"):
        model(input_ids=torch.zeros(1, 5, dtype=torch.long), output_attentions=True)


def test_a_document_pattern_is_refused():
    with pytest.raises(ValueError, match="reads segment_ids itself"):
        register("sparsec_doc", "pattern p = document & causal")
