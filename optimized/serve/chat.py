"""The checkpoint's own chat template, rendered in jinja2's sandbox.

Nothing here knows Gemma's turn format: the template comes from the checkpoint
(`chat_template.jinja`, else `chat_template.json`, else `chat_template` in tokenizer_config.json)
and is rendered with the variables transformers gives it (`messages`, `add_generation_prompt`,
`bos_token`, `eos_token`) and the same environment options (trim_blocks, lstrip_blocks, loop
controls, `raise_exception`), so a prompt renders as it would under `apply_chat_template`.
Templates are checkpoint data, not code we trust: the immutable sandbox keeps them from reaching
Python internals or mutating what they are given.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import read_tokenizer_config, special_token_text


class ChatError(ValueError):
    """Bad messages, or a template that refused them or failed to render; the message says which."""


class TemplateRaised(Exception):
    """`raise_exception(...)` called from inside a template (its way to reject a conversation)."""


def _raise_exception(message):
    raise TemplateRaised(str(message))


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    # jinja2's built-in tojson escapes <, >, & and ' for HTML; a prompt wants the plain JSON text.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


MESSAGE_KEYS = ("role", "content", "name")


def _content(value, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts
    ({"type": "text", "text": ...}) are taken, joined with newlines (as vLLM does)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ChatError(f"{where}: must be a string or a list of text parts, got {type(value).__name__}")
    texts = []
    for j, part in enumerate(value):
        here = f"{where}[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatError(f"{here}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported, "
                            f"got {kind!r}")
        if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
            raise ChatError(f"{here}: a text part is {{\"type\": \"text\", \"text\": a string}}")
        texts.append(part["text"])
    return "\n".join(texts)


def validate_messages(messages) -> list[dict]:
    """messages must be a non-empty list of {"role": str, "content": str or text parts[, "name":
    str]}; errors name the item. Content parts come out joined into one string, so templates
    see plain text."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages: must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatError(f"{where}: must be an object with \"role\" and \"content\"")
        for key in m:
            if key not in MESSAGE_KEYS:
                raise ChatError(f"{where}.{key}: unknown field (a message has \"role\", \"content\" and "
                                "optionally \"name\")")
        for key in ("role", "content"):
            if key not in m:
                raise ChatError(f"{where}.{key}: missing")
        if not isinstance(m["role"], str):
            raise ChatError(f"{where}.role: must be a string, got {type(m['role']).__name__}")
        if not m["role"]:
            raise ChatError(f"{where}.role: must not be empty")
        msg = {"role": m["role"], "content": _content(m["content"], f"{where}.content")}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise ChatError(f"{where}.name: must be a string, got {type(m['name']).__name__}")
            msg["name"] = m["name"]
        out.append(msg)
    return out


class ChatTemplate:
    """A compiled chat template with the special-token texts it may refer to."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        if not isinstance(source, str) or not source.strip():
            raise ChatError("chat template: empty")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        messages = validate_messages(messages)
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateRaised as e:
            raise ChatError(f"the chat template rejected the messages: {e}") from None
        except jinja2.TemplateError as e:  # sandbox violations, undefined calls, ...
            raise ChatError(f"chat template failed to render: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
                RecursionError) as e:
            raise ChatError(f"chat template failed to render: {type(e).__name__}: {e}") from None


def _template_from_config(cfg, where: Path) -> str | None:
    if not isinstance(cfg, dict):
        raise ChatError(f"{where}: expected a JSON object")
    t = cfg.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    # Several named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}].
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ChatError(f"{where}: chat_template is neither a string nor a list with a \"default\" template")


def load_chat_template(model: str | Path) -> ChatTemplate | None:
    """The chat template of a checkpoint directory, or None where it has none (or `model` is a
    preset name)."""
    directory = Path(model)
    if not directory.is_dir():
        return None
    cfg = read_tokenizer_config(directory)
    source = None
    jinja_file, json_file = directory / "chat_template.jinja", directory / "chat_template.json"
    try:
        if jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        elif json_file.is_file():
            source = _template_from_config(json.loads(json_file.read_text(encoding="utf-8")), json_file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatError(f"{directory}: cannot read the chat template ({e})") from None
    if source is None:
        source = _template_from_config(cfg, directory / "tokenizer_config.json")
    if source is None:
        return None
    return ChatTemplate(source, special_token_text(cfg, "bos_token"), special_token_text(cfg, "eos_token"))
