"""Chat messages -> a prompt, with the model's own chat template: the Jinja template a Hugging
Face export ships (tokenizer_config.json's `chat_template`, or chat_template.jinja), rendered as
transformers renders it, in a sandbox. A model without one has no chat API: the OpenAI route
says so and points to completions, rather than guessing a format the model never saw."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from service.errors import InvalidInput, ModelLoadError
from service.generation.tools import template_style

log = logging.getLogger(__name__)


def _raise(message: str) -> None:
    raise InvalidInput(f"the model's chat template refused the messages: {message}")


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    tool_source: str | None = None  # a named `tool_use` template, for requests with tools

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        try:
            object.__setattr__(self, "_template", env.from_string(self.source))
            tools = env.from_string(self.tool_source) if self.tool_source else self._template
            object.__setattr__(self, "_tool_template", tools)
        except jinja2.TemplateError as e:
            raise ModelLoadError(f"the chat template does not compile: {e}") from e

    @property
    def tool_style(self) -> str | None:
        """The tool-call format the template teaches (generation/tools.py), if one tserve parses."""
        return template_style(self.tool_source or self.source)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt, as transformers' apply_chat_template(messages, tools=tools,
        add_generation_prompt=True) renders it."""
        template = self._tool_template if tools else self._template
        try:
            return template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except InvalidInput:
            raise
        except jinja2.TemplateError as e:
            raise InvalidInput(f"the model's chat template failed on these messages: {e}") from None


def _token_text(value) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} as older tokenizer configs write it
        value = value.get("content")
    return value if isinstance(value, str) else ""


def load_chat_template(version_dir: Path) -> ChatTemplate | None:
    """The export's chat template, or None when it has none."""
    config_path = version_dir / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"tokenizer_config.json is unreadable: {e}") from e
    source, tool_source = config.get("chat_template"), None
    if isinstance(source, list):  # named templates: the default one, and the one for tools
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source, tool_source = named.get("default"), named.get("tool_use")
    jinja_file = version_dir / "chat_template.jinja"
    if not isinstance(source, str) and jinja_file.is_file():
        source = jinja_file.read_text()
    if not isinstance(source, str) or not source.strip():
        return None
    return ChatTemplate(
        source,
        _token_text(config.get("bos_token")),
        _token_text(config.get("eos_token")),
        tool_source if isinstance(tool_source, str) else None,
    )
