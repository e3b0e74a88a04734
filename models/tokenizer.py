"""The CLIP BPE tokenizer, torch-free, on the `tokenizers` library.

CLIP's tokenizer (paper §2.4): lower-cased byte-level BPE with a 49,408-token vocabulary, wrapped in
start/end tokens and padded with 0 to the context length; an over-long text is truncated and its last
position replaced by the end token. The vocabulary comes from open_clip's `bpe_simple_vocab_16e6.txt.gz`,
turned once into a `tokenizer.json` by `build_tokenizer_json`. Text is cleaned the way open_clip cleans
it (ftfy, HTML entities unescaped twice, whitespace collapsed, lower-cased) in Python before the Rust BPE
runs, so the ids are the same as open_clip's; the tokenizer.json therefore expects cleaned text.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

DEFAULT_CONTEXT_LENGTH = 77
VOCAB_SIZE = 49_408
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# open_clip's word pattern: contractions, letter runs, single digits, runs of other non-space symbols.
_WORD_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# open_clip recognises a special token only where its word pattern would start a new word; the Rust
# added-token matcher finds one anywhere ("!<end_of_text>"). Texts that contain one are split this way first.
_SPECIAL_AWARE_SPLIT = pre_tokenizers.Split(
    Regex(f"{SOT_TOKEN}|{EOT_TOKEN}|{_WORD_PATTERN}"), behavior="removed", invert=True
)


@dataclass(frozen=True)
class TokenizerSpec:
    """What a model needs from its tokenizer; the manifest and the zoo both carry one."""

    context_length: int = DEFAULT_CONTEXT_LENGTH
    sot_token_id: int = VOCAB_SIZE - 2
    eot_token_id: int = VOCAB_SIZE - 1
    pad_token_id: int = 0
    vocab_size: int = VOCAB_SIZE


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, HTML entities (twice), collapsed whitespace, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte alphabet: printable bytes map to themselves, the rest to code points from 256 up.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def find_open_clip_bpe() -> Path:
    """The BPE merges file shipped inside open_clip_torch, located without importing it (or torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed; install the 'export' extra")
    path = Path(next(iter(spec.submodule_search_locations))) / _BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open_clip_torch installation")
    return path


def build_tokenizer_json(bpe_path: Path | None = None) -> str:
    """Builds CLIP's tokenizer.json (vocabulary, merges, pre-tokeniser, decoder) from the BPE file."""
    with gzip.open(bpe_path or find_open_clip_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    # Line 0 is a version header; open_clip keeps the next 48,894 merges (49,152 - 256 bytes - 2 specials).
    merges = [(first, second) for first, second in (line.split() for line in lines[1 : 49152 - 256 - 2 + 1])]
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    if len(vocab_list) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} tokens, built {len(vocab_list)}")
    vocab = {token: i for i, token in enumerate(vocab_list)}

    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=None, fuse_unk=False)
    # No normaliser: `clean_text` (Python, like open_clip) does ftfy, NFC, whitespace and lower case. A Rust
    # Lowercase would disagree with Python's on letters newer than the interpreter's Unicode tables.
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # The end-of-word marker becomes the byte-level alphabet's space (U+0120) *before* bytes are decoded,
    # so multi-byte characters split over tokens decode whole.
    tokenizer.decoder = decoders.Sequence([decoders.Replace("</w>", "\u0120"), decoders.ByteLevel()])
    tokenizer.add_special_tokens([AddedToken(SOT_TOKEN), AddedToken(EOT_TOKEN)])
    return tokenizer.to_str(pretty=False)


class ClipTokenizer:
    """Texts -> int64 ids [B, context_length], as open_clip's tokenizer returns them."""

    def __init__(self, tokenizer: Tokenizer, spec: TokenizerSpec | None = None) -> None:
        self._tokenizer = tokenizer
        self.spec = spec or TokenizerSpec()
        if tokenizer.get_vocab_size() != self.spec.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, spec says {self.spec.vocab_size}")

    @classmethod
    def from_file(cls, path: str | Path, spec: TokenizerSpec | None = None) -> ClipTokenizer:
        return cls(Tokenizer.from_file(str(path)), spec)

    @classmethod
    def from_json(cls, text: str, spec: TokenizerSpec | None = None) -> ClipTokenizer:
        return cls(Tokenizer.from_str(text), spec)

    @property
    def context_length(self) -> int:
        return self.spec.context_length

    def _encode_clean(self, texts: list[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        for row, text in enumerate(texts):
            if SOT_TOKEN in text or EOT_TOKEN in text:  # rare: replay open_clip's scanner word by word
                words = [word for word, _ in _SPECIAL_AWARE_SPLIT.pre_tokenize_str(text)]
                ids[row] = [i for word in words for i in self._tokenizer.encode(word, add_special_tokens=False).ids]
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens or padding."""
        return self._encode_clean([clean_text(text)])[0]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.spec.context_length
        if length < 2:
            raise ValueError("context_length must leave room for the start and end tokens (>= 2)")
        ids = np.full((len(texts), length), self.spec.pad_token_id, dtype=np.int64)
        for row, encoded in enumerate(self._encode_clean([clean_text(t) for t in texts])):
            tokens = [self.spec.sot_token_id, *encoded[: length - 2], self.spec.eot_token_id]
            ids[row, : len(tokens)] = tokens
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True).removesuffix(" ")


@lru_cache(maxsize=1)
def open_clip_tokenizer_json() -> str:
    """CLIP's tokenizer.json built from the open_clip install; cached, it takes about a second."""
    return build_tokenizer_json()


def vocabulary_words(tokenizer_json: str) -> list[str]:
    """Whole-word entries of the vocabulary (alphabetic, ending a word): a cheap English word list."""
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    return sorted(t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha())
