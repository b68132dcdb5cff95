"""SFT tokenisation with labels, shared by the idxmap builder and the raw-JSON dataset.

A conversation is rendered with its generation's template (``templates.render``) and the
whole text is tokenised once, special-token strings parsed, nothing added - the same ids as
``tokenizer.apply_chat_template(messages)``. A token is an answer token when its character
span overlaps a trainable segment (so a token straddling "[/INST] " and the answer's first
word counts as the answer's first token).

Stored per sample (int32, so Llama-3 ids above 65535 and -100 both fit):
  ids            the token ids
  token_labels   ids on answer tokens, -100 elsewhere; NOT shifted (token_labels[i] says
                 whether token i is learned). ``make_item`` shifts them for training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np

from .problems import Problem, RecordError
from .sft_records import record_to_messages
from .sources import Chunk, chunk_records
from .templates import LLAMA3_HEADER_TOKENS, TEMPLATE_FAMILY, normalize_generation, render

IGNORE_INDEX = -100
ID_DTYPE = np.int32


class SFTEncoder:
    def __init__(self, tokenizer, generation: str):
        self.tokenizer = tokenizer
        self.generation = normalize_generation(generation)
        family = TEMPLATE_FAMILY[self.generation]
        if family == "llama3":
            for tok in LLAMA3_HEADER_TOKENS:
                try:
                    tokenizer.token_id(tok)
                except ValueError:
                    raise ValueError(f"generation {self.generation} needs a Llama-3 tokenizer "
                                     f"({tok} is missing from {tokenizer.name_or_path})") from None
        elif tokenizer.bos_token is None:
            raise ValueError(f"generation {self.generation} needs a tokenizer with a bos token")

    def render(self, messages) -> Tuple[str, List[Tuple[int, int]]]:
        """Full text and the character spans of its trainable segments."""
        segments = render(messages, self.generation, self.tokenizer.bos_token,
                          self.tokenizer.eos_token)
        spans, pos = [], 0
        for s in segments:
            if s.train:
                spans.append((pos, pos + len(s.text)))
            pos += len(s.text)
        return "".join(s.text for s in segments), spans

    def encode_rendered(self, rendered: Sequence[Tuple[str, list]]
                        ) -> List[Tuple[np.ndarray, np.ndarray]]:
        encodings = self.tokenizer.encode_with_offsets([text for text, _ in rendered])
        return [_with_labels(enc, spans) for enc, (_, spans) in zip(encodings, rendered)]

    def encode_messages(self, conversations: Sequence[list]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """(ids, token_labels) per conversation; RecordError for a malformed one."""
        return self.encode_rendered([self.render(m) for m in conversations])


def _with_labels(encoding, spans) -> Tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(encoding.ids, dtype=ID_DTYPE)
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    starts = np.array([a for a, _ in spans], dtype=np.int64)
    ends = np.array([b for _, b in spans], dtype=np.int64)
    # first span ending after the token starts; the token overlaps it if it ends after its start
    k = np.searchsorted(ends, offsets[:, 0], side="right")
    inside = k < len(spans)
    train = np.zeros(len(ids), dtype=bool)
    train[inside] = offsets[inside, 1] > starts[k[inside]]
    labels = np.where(train, ids, IGNORE_INDEX).astype(ID_DTYPE)
    return ids, labels


def has_loss(labels: np.ndarray, seq_len: int) -> bool:
    """Whether any target survives in a training window of ``seq_len`` (targets are
    token_labels[1 : seq_len + 1])."""
    return bool((labels[1:seq_len + 1] != IGNORE_INDEX).any())


@dataclass
class EncodedChunk:
    # in input order: (ids, token_labels) for a kept sample, Problem for a skipped record
    items: list = field(default_factory=list)
    truncated: int = 0
    nbytes: int = 0


def encode_sft_chunk(chunk: Chunk, encoder: SFTEncoder, seq_len: int) -> EncodedChunk:
    """Records of one chunk -> truncated (ids, token_labels) samples and skipped records.

    Samples are cut to ``seq_len + 1`` tokens (a window of seq_len inputs and their next-token
    targets); one whose answers all fall beyond the cut is skipped."""
    out = EncodedChunk(nbytes=chunk.nbytes)
    entries, rendered, lines = [], [], []
    for line, rec in chunk_records(chunk):
        if isinstance(rec, Problem):
            entries.append(rec)
            continue
        try:
            rendered.append(encoder.render(record_to_messages(rec)))
        except RecordError as exc:
            entries.append(Problem(chunk.source, line, exc.kind, exc.detail, chunk.unit))
            continue
        lines.append(line)
        entries.append(len(rendered) - 1)
    encoded = encoder.encode_rendered(rendered) if rendered else []
    for e in entries:
        if isinstance(e, Problem):
            out.items.append(e)
            continue
        ids, labels = encoded[e]
        if len(ids) > seq_len + 1:
            out.truncated += 1
            ids, labels = ids[:seq_len + 1], labels[:seq_len + 1]
        if has_loss(labels, seq_len):
            out.items.append((ids, labels))
        else:
            out.items.append(Problem(chunk.source, lines[e], "no answer token within seq_len",
                                     f"{len(encoded[e][0])} tokens, seq_len {seq_len}", chunk.unit))
    return out


# -- training items --------------------------------------------------------------------------
def next_fit_packs(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Group consecutive samples while their total length fits ``capacity`` (order kept)."""
    packs: List[List[int]] = []
    current: List[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > capacity:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def make_item(ids: np.ndarray, token_labels: np.ndarray, seq_len: int, pad_id: int):
    """Fixed-length training arrays in megatron's convention (int64):

    input_ids[t] = ids[t]                 (pad_id after the sample)
    labels[t]    = token_labels[t + 1]    the target of position t is the NEXT token,
                                          -100 where it is not an answer token or past the end
    """
    n = len(ids)
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    m = min(n, seq_len)
    input_ids[:m] = ids[:m]
    k = min(n - 1, seq_len)
    if k > 0:
        labels[:k] = token_labels[1:k + 1]
    return input_ids, labels
