"""A checkpoint's tokenizer: `tokenizer.json` through the optional `tokenizers` package, with the
special-token settings of `tokenizer_config.json` (Gemma prepends <bos>, id 2).

`load_tokenizer` answers None where there is nothing to load (a preset name, or a directory without
tokenizer.json); the server then takes token ids only. A tokenizer.json that exists but cannot be
read, or a missing `tokenizers` package, is an error: serving such a checkpoint without text would
hide the problem.
"""

from __future__ import annotations

import json
from pathlib import Path


class TokenizerError(ValueError):
    """A tokenizer file is unreadable, or text was sent where no tokenizer can encode it."""


def read_tokenizer_config(directory: str | Path) -> dict:
    """tokenizer_config.json as a dict ({} if absent); a broken file is an error, not silence."""
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return cfg


def special_token_text(cfg: dict, key: str) -> str | None:
    """The text of a special token in tokenizer_config.json: a string, or transformers' serialised
    AddedToken ({"content": ...})."""
    value = cfg.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        return None
    return tokenizers


class Tokenizer:
    """encode/decode over a `tokenizers.Tokenizer`, with bos/eos handling from tokenizer_config.json.

    Where the config says `add_bos_token` / `add_eos_token`, those decide (as transformers does):
    text is encoded without the tokenizer.json post-processor and bos/eos are added here, so a
    post-processor that also adds <bos> cannot double it. Where the config is silent, the
    post-processor decides."""

    def __init__(self, backend, bos_token: str | None = None, eos_token: str | None = None,
                 add_bos_token: bool | None = None, add_eos_token: bool | None = None):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        tokenizers = _import_tokenizers()
        if tokenizers is None:
            raise TokenizerError(f"{directory / 'tokenizer.json'} needs the `tokenizers` package "
                                 "(pip install tokenizers); without it the server takes token ids only")
        try:
            backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the Rust side raises plain Exception for every parse failure
            raise TokenizerError(f"{directory / 'tokenizer.json'}: cannot load ({e})") from None
        cfg = read_tokenizer_config(directory)
        flags = {}
        for key in ("add_bos_token", "add_eos_token"):
            value = cfg.get(key)
            if value is not None and not isinstance(value, bool):
                raise TokenizerError(f"{directory / 'tokenizer_config.json'}: {key} must be true or false")
            flags[key] = value
        tok = cls(backend, special_token_text(cfg, "bos_token"), special_token_text(cfg, "eos_token"), **flags)
        for key in ("bos_token", "eos_token"):
            text = getattr(tok, key)
            if text is not None and getattr(tok, key + "_id") is None:
                raise TokenizerError(f"{directory}: {key} {text!r} of tokenizer_config.json is not in tokenizer.json")
        if tok.add_bos_token and tok.bos_token_id is None:
            raise TokenizerError(f"{directory}: add_bos_token is set but no bos_token is named")
        if tok.add_eos_token and tok.eos_token_id is None:
            raise TokenizerError(f"{directory}: add_eos_token is set but no eos_token is named")
        return tok

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        explicit = self.add_bos_token is not None or self.add_eos_token is not None
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens and not explicit).ids
        if add_special_tokens and explicit:
            if self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token:
                ids = [*ids, self.eos_token_id]
        return list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    def token_text(self, token: int) -> str:
        """One token's own text, special tokens included (the `token` of a logprobs entry)."""
        return self.backend.decode([token], skip_special_tokens=False)


class IncrementalDecoder:
    """Text deltas for a token stream, token by token.

    Decoding a token alone loses what depends on its neighbours (a sentencepiece leading space, a
    UTF-8 character split over byte tokens), so text is emitted only once it is final. Where the
    `tokenizers` package has `decoders.DecodeStream` (0.21+), that does the work in Rust;
    otherwise each step decodes a short window that starts a few tokens back and emits only what
    the new token added, holding back a window that ends in U+FFFD (an unfinished character)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: the token before the last emitted text
        self.read = 0  # tokens whose text has been emitted
        self.emitted = 0  # characters emitted so far
        decoders = getattr(_import_tokenizers(), "decoders", None)
        make = getattr(decoders, "DecodeStream", None)
        self._stream = make(skip_special_tokens=skip_special_tokens) if make is not None else None

    def _text(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self._stream is not None:
            piece = self._stream.step(self.tokenizer.backend, token) or ""
            self.emitted += len(piece)
            return piece
        before = self._text(self.ids[self.prefix:self.read])
        after = self._text(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted += len(after) - len(before)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD)."""
        if self._stream is not None:
            rest = self._text(self.ids)[self.emitted:]
            self._stream = type(self._stream)(skip_special_tokens=self.skip)  # later pushes start afresh
            self.ids, self.emitted = [], 0
            return rest
        before = self._text(self.ids[self.prefix:self.read])
        after = self._text(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


def load_tokenizer(model: str | Path) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory, or None for a preset name or a directory without
    tokenizer.json."""
    directory = Path(model)
    if not directory.is_dir() or not (directory / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_dir(directory)
