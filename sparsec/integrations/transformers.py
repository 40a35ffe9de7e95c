"""`register(name, pattern)`: a sparsec pattern as a Hugging Face transformers `attn_implementation`.

For models whose attention layers call `AttentionInterface` (Llama, Mistral, Qwen, Gemma...):
`register("sparse", "longformer", w=256)`, then
`AutoModelForCausalLM.from_config(config, attn_implementation="sparse")` or
`model.set_attn_implementation("sparse")`. The model's padding mask becomes key padding: the call
runs `(pattern) & document` with segment ids 1 for real tokens and 0 for padding, so a real token
never sees a pad, whatever the pattern. Queries sit at the end of the keys (q_offset = n_k - n_q),
which is where a growing KV cache puts them during generate(). Sliding-window caches that drop old
keys would shift positions: express the window in the pattern instead (docs/design.md)."""
from __future__ import annotations

import os

import torch

from ..compiled import CompiledPattern, compile


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """transformers' mask step for our name: the 2D padding mask (B, kv_length) of the keys, or
    None when nothing is padded; the pattern itself is sparsec's."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if attention_mask.shape[1] == kv_length and bool(attention_mask.all()) else attention_mask


def attention_function(kern: CompiledPattern):
    """The attention function transformers calls: (module, query (B, Hq, n_q, D), key, value
    (B, Hkv, n_k, D), attention_mask, ...) -> (output (B, n_q, Hq, D), None)."""
    if "segment_ids" in kern.needs:
        raise ValueError(f"pattern {kern.name} reads segment_ids itself; the transformers route uses them for "
                         f"the padding mask, so register a pattern without document")
    padded = compile(f"pattern {kern.name}_padded = ({kern.ir.body.show()}) & document", autotune=kern.autotune,
                     config=kern.config)

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions=True: sparsec never forms the attention matrix; use "
                             "attn_implementation='eager' to inspect attention weights")
        if dropout and module.training:
            raise ValueError(f"attention dropout ({dropout}) is not supported by sparsec; set the config's "
                             f"attention_dropout to 0")
        if attention_mask is None:
            o = kern(query, key, value, scale=scaling)
        elif attention_mask.dim() != 2:
            raise ValueError(f"expected the 2D padding mask sparsec registers for, got shape "
                             f"{tuple(attention_mask.shape)} (was the attn_implementation set through "
                             f"sparsec.integrations.transformers.register?)")
        else:
            o = padded(query, key, value, scale=scaling, segment_ids=attention_mask.to(torch.int64))
        return o.transpose(1, 2).contiguous(), None
    return forward


def register(name: str, pattern: CompiledPattern | str | os.PathLike, **params) -> CompiledPattern:
    """Make `name` an attn_implementation running `pattern` (a CompiledPattern, a library name, a
    .sa path or program text, with its params); returns the compiled pattern."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    kern = pattern if isinstance(pattern, CompiledPattern) else compile(pattern, **params)
    if isinstance(pattern, CompiledPattern) and params:
        raise ValueError("pattern is already compiled: params apply to a name, path or source")
    AttentionInterface.register(name, attention_function(kern))
    AttentionMaskInterface.register(name, _padding_mask)
    return kern
