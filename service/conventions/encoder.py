"""The BERT-style encoder convention: input_ids, attention_mask (and token_type_ids) ->
last_hidden_state [batch, sequence, hidden], or a classification head's logits.

Such a graph can batch requests of different lengths with no configuration: right-pad the ids
with the pad token, the mask and the token types with 0 (the mask hides the padding), and cut
last_hidden_state back to each request's length.
"""

from __future__ import annotations

from collections.abc import Iterable

INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS = "input_ids", "attention_mask", "token_type_ids"
LAST_HIDDEN_STATE, LOGITS = "last_hidden_state", "logits"
PADDED = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)


def classification_head(architectures: Iterable[str]) -> str | None:
    """ "sequence" or "token" when config.json's architectures name a classification head: only
    then is a graph's `logits` output a few labels wide, not a vocabulary (a masked or causal
    language model's), so batching many padded rows stays cheap."""
    for a in architectures:
        if a.endswith("ForSequenceClassification"):
            return "sequence"
        if a.endswith("ForTokenClassification"):
            return "token"
    return None


def padding_rules(
    inputs: Iterable[str], outputs: dict[str, tuple[int, ...]], pad_token_id: int = 0, head: str | None = None
) -> tuple[dict[str, float], tuple[str, ...]] | None:
    """(pad value per input, outputs to cut back) if the graph follows the convention, else None.
    `outputs` maps each output to its dims after the batch axis: those with a symbolic first dim
    are per token (last_hidden_state [T, H], a token classifier's logits [T, L]) and are cut
    back; the others (a sequence classifier's logits [L], a pooler output [H]) are per row.
    `logits` counts only with a classification `head` (classification_head)."""
    names = set(inputs)
    if not ({INPUT_IDS, ATTENTION_MASK} <= names <= {INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS}):
        return None
    if LAST_HIDDEN_STATE not in outputs and not (head and LOGITS in outputs):
        return None
    pads = {INPUT_IDS: float(pad_token_id), ATTENTION_MASK: 0.0}
    if TOKEN_TYPE_IDS in names:
        pads[TOKEN_TYPE_IDS] = 0.0
    return pads, tuple(name for name, dims in outputs.items() if dims and dims[0] == -1)
