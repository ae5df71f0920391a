"""Architecture rules from tensor names: which tensors feed an activation, and signal order.

Hugging Face configs name one activation (``hidden_act`` / ``activation_function``) for the
whole model, but only the MLP's input projections feed it: GPT-2 ``mlp.c_fc``, Llama/Mistral/
Qwen ``mlp.gate_proj`` and ``mlp.up_proj`` (the gated product), BERT/RoBERTa
``intermediate.dense``, OPT/ViT/CLIP/Phi ``fc1``, GPT-NeoX/Falcon/BLOOM ``dense_h_to_4h``,
GPT-J ``mlp.fc_in``, T5 ``DenseReluDense.wi`` / ``wi_0`` / ``wi_1``, Mixtral experts ``w1`` /
``w3``, DistilBERT ``lin1``. Attention projections (q/k/v/o, ``c_attn``, ``query``/``key``/
``value``), MLP output projections (``c_proj``, ``down_proj``, ``fc2``, ``output.dense``...),
embeddings and ``lm_head`` feed none: they get ``NO_ACTIVATION``. A 2-D tensor matching
neither list keeps the activation unknown (no rule: no claim).

Signal order (``signal_key``): (block index, position within the block), so a Carnot pair is
a layer and the next one the signal passes through, not the next in name order (Llama's
``mlp`` sorts before ``self_attn`` by name). Parallel tensors (q, k, v; gate, up) share a
position. Names without a known role keep their natural order by block index (the demo MLP's
``layers.0`` -> ``layers.1`` -> ``layers.2``). METHODS.md, "Heat-engine efficiencies".
"""

from __future__ import annotations

import re

NO_ACTIVATION = "none"

_FEEDS = re.compile(
    r"(^|\.)(c_fc|gate_proj|up_proj|fc1|fc_in|dense_h_to_4h|lin1|w1|w3|wi|wi_0|wi_1|"
    r"intermediate\.dense|gate_up_proj)\.weight$"
)
_NO_ACT = re.compile(
    r"(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj|query_key_value|c_attn|c_proj|out_proj|"
    r"query|key|value|down_proj|fc2|fc_out|dense_4h_to_h|lin2|w2|wo|q|k|v|o|"
    r"attention\.output\.dense|output\.dense|attention\.dense|"
    r"wte|wpe|embed_tokens|embed_positions|word_embeddings|position_embeddings|"
    r"token_type_embeddings|shared|embed_in|embed_out|lm_head|score|classifier)\.weight$"
)

# position of a tensor within its block, in signal order (lower first)
_POSITIONS = (
    (re.compile(r"(embed|wte|wpe|embeddings|shared)"), 0),
    (
        re.compile(
            r"(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|\.query|\.key|\.value|"
            r"\.q\.|\.k\.|\.v\.)"
        ),
        1,
    ),
    (
        re.compile(
            r"(o_proj|attn\.c_proj|out_proj|attention\.output\.dense|attention\.dense|"
            r"\.o\.)"
        ),
        2,
    ),
    (
        re.compile(
            r"(c_fc|gate_proj|up_proj|fc1|fc_in|dense_h_to_4h|lin1|\.w1\.|\.w3\.|\.wi|"
            r"intermediate\.dense|gate_up_proj)"
        ),
        3,
    ),
    (
        re.compile(
            r"(mlp\.c_proj|down_proj|fc2|fc_out|dense_4h_to_h|lin2|\.w2\.|\.wo\.|"
            r"output\.dense)"
        ),
        4,
    ),
    (re.compile(r"(lm_head|score|classifier|embed_out)"), 9),
)
_BLOCK = re.compile(r"\.(\d+)\.")


def activation_after(name: str, is_matrix: bool, model_activation: str) -> str | None:
    """The activation a tensor feeds: ``model_activation`` for MLP input projections,
    ``NO_ACTIVATION`` for tensors known to feed none, None (unknown) otherwise and for 1-D
    tensors (biases, norm gains: measured, but no engine)."""
    if not is_matrix:
        return None
    if _FEEDS.search(name):
        return model_activation
    if _NO_ACT.search(name):
        return NO_ACTIVATION
    return None


def signal_key(name: str, natural_index: int) -> tuple[float, int, int]:
    """Sort key in signal order: (block index, position within the block, natural index).

    Block index: the first ``.N.`` in the name (embeddings before any block: -1; heads such
    as ``lm_head`` after every block: inf). Position: 0 embeddings, 1 attention input, 2
    attention output, 3 MLP input, 4 MLP output, 9 head; 5 for unknown roles."""
    position = next((p for pattern, p in _POSITIONS if pattern.search(name)), 5)
    block = _BLOCK.search("." + name)
    if position == 0 and block is None:
        index = -1.0
    elif position == 9 and block is None:
        index = float("inf")
    else:
        index = float(block.group(1)) if block else float(natural_index)
    return index, position, natural_index


def signal_partners(names, is_vector) -> list[int]:
    """For each tensor, the index of the next 2-D tensor the signal passes through (the first
    with a strictly larger (block, position) in ``signal_key`` order, so parallel siblings such
    as q/k/v are skipped), or -1 (1-D tensors, the last layer)."""
    keys = [signal_key(str(n), i) for i, n in enumerate(names)]
    matrices = sorted((k, i) for i, k in enumerate(keys) if not is_vector[i])
    out = []
    for i, key in enumerate(keys):
        later = [j for k, j in matrices if k[:2] > key[:2]] if not is_vector[i] else []
        out.append(later[0] if later else -1)
    return out
