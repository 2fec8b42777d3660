"""Token alignment: give the sharer exactly one token per receiver position.

The receiver's chat template is rendered and tokenized, and every receiver token is
labelled with the section it belongs to:

- SPECIAL: a special token of the template (BOS, turn start, turn end). It maps to the
  sharer's counterpart: BOS to BOS, the receiver's turn-start marker (`<|im_start|>`)
  to the sharer's (`<start_of_turn>`), turn end to turn end, EOS to EOS.
- ROLE: the role word that follows a turn-start marker (`assistant`). The whole role
  word is rewritten to the sharer's word for that role (`model`) and re-encoded, and
  its pieces are spread over the receiver's tokens in order.
- TEXT: everything else (message contents and plain template text). Each token is
  decoded and its text re-encoded with the sharer's tokenizer: one piece maps
  directly, several pieces give the longest one. Tokens that only decode together
  (the bytes of one emoji) are decoded as one unit first.

Layer alignment is not here: see `terminal_layer_map` in `fuser.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

SPECIAL, ROLE, TEXT = "special", "role", "text"
SENTINEL = "CACHETALKSENTINEL"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TemplateMarkers:
    """The special tokens and role words a tokenizer's chat template writes."""

    turn_start: str | None
    turn_end: str | None
    role_words: dict[str, str]  # chat role ("assistant") -> word in the template ("model")


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Return the text of every special token, longest first so that no prefix matches early."""
    strings = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    strings |= set(tokenizer.all_special_tokens)
    return sorted(strings, key=len, reverse=True)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _find_specials(text: str, specials: list[str]) -> list[tuple[int, str]]:
    """Return (position, token text) of each special token in `text`, left to right."""
    found, i = [], 0
    while i < len(text):
        match = next((s for s in specials if text.startswith(s, i)), None)
        if match:
            found.append((i, match))
            i += len(match)
        else:
            i += 1
    return found


def _markers_uncached(tokenizer: PreTrainedTokenizerBase) -> TemplateMarkers:
    specials = _special_strings(tokenizer)
    role_words, turn_start, turn_end = {}, None, None
    for role in ROLES:
        messages = [{"role": role, "content": SENTINEL}]
        if role == "system":
            messages.append({"role": "user", "content": "x"})
        if role == "assistant":
            messages.insert(0, {"role": "user", "content": "x"})
        before, _, after = _render(tokenizer, messages).partition(SENTINEL)

        # Some tokenizers (SmolLM2) name their turn-start marker as BOS too.
        starts = _find_specials(before, specials)
        if starts:
            position, turn_start = starts[-1]
            # Gemma folds the system turn into the first user turn: the role line is "user".
            role_words[role] = before[position + len(turn_start):].strip().split("\n")[0].strip()
        ends = _find_specials(after, specials)
        if ends and turn_end is None:
            turn_end = ends[0][1]
    return TemplateMarkers(turn_start, turn_end, {r: w for r, w in role_words.items() if w})


@lru_cache(maxsize=16)
def _markers_by_id(key: int, tokenizer: PreTrainedTokenizerBase) -> TemplateMarkers:
    return _markers_uncached(tokenizer)


def template_markers(tokenizer: PreTrainedTokenizerBase) -> TemplateMarkers:
    """Find the turn markers and role words by rendering one sentinel message per role."""
    if getattr(tokenizer, "chat_template", None) is None:
        return TemplateMarkers(None, None, {})
    return _markers_by_id(id(tokenizer), tokenizer)


def label_tokens(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                 add_generation_prompt: bool = True) -> tuple[list[int], list[str]]:
    """Render the chat template, tokenize it and label each token SPECIAL, ROLE or TEXT."""
    text = _render(tokenizer, messages, add_generation_prompt)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    special_ids = {tokenizer.convert_tokens_to_ids(s) for s in _special_strings(tokenizer)}
    markers = template_markers(tokenizer)

    # Character spans of role words: from the end of a turn-start marker to the line end.
    role_spans = []
    if markers.turn_start:
        position = text.find(markers.turn_start)
        while position >= 0:
            start = position + len(markers.turn_start)
            end = text.find("\n", start)
            role_spans.append((start, end if end >= 0 else len(text)))
            position = text.find(markers.turn_start, start)

    labels = []
    for token_id, (start, end) in zip(ids, offsets):
        if token_id in special_ids:
            labels.append(SPECIAL)
        elif any(start < span_end and end > span_start for span_start, span_end in role_spans):
            labels.append(ROLE)
        else:
            labels.append(TEXT)
    return ids, labels


def _sharer_special(receiver: PreTrainedTokenizerBase, sharer: PreTrainedTokenizerBase,
                    token: str) -> int:
    """Map one receiver special token to the sharer token with the same job."""
    r_markers, s_markers = template_markers(receiver), template_markers(sharer)
    counterparts = {
        receiver.bos_token: sharer.bos_token,
        receiver.eos_token: sharer.eos_token,
        receiver.pad_token: sharer.pad_token,
        r_markers.turn_start: s_markers.turn_start,
        r_markers.turn_end: s_markers.turn_end,
    }
    counterparts.pop(None, None)
    target = counterparts.get(token)
    if target is None and token in sharer.get_vocab():
        target = token
    if target is None:
        target = sharer.eos_token or sharer.unk_token
    return sharer.convert_tokens_to_ids(target)


def _longest_piece(sharer: PreTrainedTokenizerBase, pieces: list[int]) -> int:
    return max(pieces, key=lambda i: len(sharer.decode([i])))


def _spread(pieces: list[int], count: int) -> list[int]:
    """Assign `count` receiver tokens to `pieces` in order, proportionally."""
    return [pieces[min(k * len(pieces) // count, len(pieces) - 1)] for k in range(count)]


def _fallback_id(sharer: PreTrainedTokenizerBase) -> int:
    """Return the sharer token for a receiver token with no text of its own: a space."""
    pieces = sharer.encode(" ", add_special_tokens=False)
    return pieces[0] if pieces else sharer.unk_token_id


def _text_units(receiver: PreTrainedTokenizerBase, ids: list[int]) -> list[tuple[int, int, str]]:
    """Group token ids into (start, end, text) units that decode to whole characters."""
    units, start = [], 0
    while start < len(ids):
        end = start + 1
        text = receiver.decode(ids[start:end])
        # Byte-level BPE splits some characters (emoji) over several tokens.
        while text.endswith("\ufffd") and end < len(ids) and end - start < 8:
            end += 1
            text = receiver.decode(ids[start:end])
        if text.endswith("\ufffd"):
            end, text = start + 1, receiver.decode(ids[start:start + 1])
        units.append((start, end, text))
        start = end
    return units


def _map_text(receiver, sharer, ids: list[int], role_words: dict[str, str] | None = None) -> list[int]:
    out = []
    for start, end, text in _text_units(receiver, ids):
        if role_words is not None:
            text = role_words.get(text.strip(), text.strip())
        pieces = sharer.encode(text, add_special_tokens=False) if text else []
        if not pieces:
            out.extend([_fallback_id(sharer)] * (end - start))
        elif end - start == 1:
            out.append(pieces[0] if len(pieces) == 1 else _longest_piece(sharer, pieces))
        else:
            out.extend(_spread(pieces, end - start))
    return out


def align_ids(receiver_tokenizer: PreTrainedTokenizerBase, sharer_tokenizer: PreTrainedTokenizerBase,
              receiver_ids: list[int], labels: list[str]) -> list[int]:
    """Return one sharer token id per receiver token id, given each token's section label.

    `labels` come from `label_tokens`; training uses this directly for prompt plus
    response. Identical vocabularies return the receiver ids unchanged.
    """
    if len(receiver_ids) != len(labels):
        raise ValueError(f"got {len(receiver_ids)} token ids but {len(labels)} labels")
    if same_vocabulary(receiver_tokenizer, sharer_tokenizer):
        return list(receiver_ids)

    r_roles = template_markers(receiver_tokenizer).role_words
    s_roles = template_markers(sharer_tokenizer).role_words
    role_words = {word: s_roles.get(role, word) for role, word in r_roles.items()}

    sharer_ids: list[int] = []
    i = 0
    while i < len(receiver_ids):
        j = i + 1
        while j < len(receiver_ids) and labels[j] == labels[i] and labels[i] != SPECIAL:
            j += 1
        run = receiver_ids[i:j]
        if labels[i] == SPECIAL:
            token = receiver_tokenizer.convert_ids_to_tokens(run[0])
            sharer_ids.append(_sharer_special(receiver_tokenizer, sharer_tokenizer, token))
        elif labels[i] == ROLE:
            word = receiver_tokenizer.decode(run)
            stripped = word.strip()
            target = word.replace(stripped, role_words.get(stripped, stripped)) if stripped else word
            pieces = sharer_tokenizer.encode(target, add_special_tokens=False) or [_fallback_id(sharer_tokenizer)]
            sharer_ids.extend(_spread(pieces, len(run)))
        else:
            sharer_ids.extend(_map_text(receiver_tokenizer, sharer_tokenizer, run))
        i = j

    _start_with_bos(receiver_tokenizer, sharer_tokenizer, receiver_ids, sharer_ids)
    return sharer_ids


def _start_with_bos(receiver, sharer, receiver_ids: list[int], sharer_ids: list[int]) -> None:
    """Put the sharer's BOS at position 0 when the sharer's template starts with one.

    The sharer's sequence then starts as its own template starts it. When the receiver's
    sequence has no BOS of its own, its first token (usually a turn-start marker) gives way.
    """
    if not sharer_ids or sharer.bos_token_id is None or sharer_ids[0] == sharer.bos_token_id:
        return
    if getattr(sharer, "chat_template", None) is None:
        return
    rendered = _render(sharer, [{"role": "user", "content": "x"}])
    if rendered.startswith(sharer.bos_token):
        sharer_ids[0] = sharer.bos_token_id


def align_tokens(receiver_tokenizer: PreTrainedTokenizerBase, sharer_tokenizer: PreTrainedTokenizerBase,
                 messages: list[dict], add_generation_prompt: bool = True) -> tuple[list[int], list[int]]:
    """Tokenize a chat for the receiver and give the sharer one token per receiver position.

    Example:
        >>> receiver_ids, sharer_ids = align_tokens(smollm.tokenizer, gemma.tokenizer,
        ...                                         [{"role": "user", "content": "Hi"}])
        >>> len(receiver_ids) == len(sharer_ids)
        True
    """
    receiver_ids, labels = label_tokens(receiver_tokenizer, messages, add_generation_prompt)
    return receiver_ids, align_ids(receiver_tokenizer, sharer_tokenizer, receiver_ids, labels)
