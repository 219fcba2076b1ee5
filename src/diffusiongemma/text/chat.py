"""Chat templates: render messages (and tool declarations) to the prompt string.

The template is the checkpoint's own (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`), rendered with jinja2 in an immutable sandbox set up as transformers sets
it up (trim_blocks, lstrip_blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now`,
`namespace`), so the same template and messages give the same string.

`normalize_messages` turns OpenAI-style chat messages into what the Gemma 4 template reads: tool-call
arguments as objects (OpenAI sends a JSON string), tool results as a `response` with the tool's
`name` (looked up from the call id), reasoning fields dropped from earlier assistant turns.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatError(ValueError):
    """Messages or tools that cannot be rendered; the message says which and why."""


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set underscore attributes ({name!r})")


def default_template() -> str:
    return resources.files("diffusiongemma.text").joinpath("templates/gemma4.jinja").read_text()


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.now().strftime(f),
                           namespace=_Namespace, dict=lambda *a, **k: dict(*a, **k))
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatError(f"chat template does not compile: {e}") from None
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dir(cls, path: str | Path, special_tokens: dict[str, str] | None = None) -> ChatTemplate:
        path = Path(path)
        if (path / "chat_template.jinja").is_file():
            return cls((path / "chat_template.jinja").read_text(), special_tokens)
        cfg = path / "tokenizer_config.json"
        if cfg.is_file():
            tpl = json.loads(cfg.read_text()).get("chat_template")
            if isinstance(tpl, list):  # named templates: take "default"
                tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
            if isinstance(tpl, str):
                return cls(tpl, special_tokens)
        raise ChatError(f"{path} has no chat template (chat_template.jinja or tokenizer_config.json)")

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise ChatError(f"chat template failed: {e}") from None


def validate_tools(tools: list[dict] | None) -> list[dict] | None:
    """Check OpenAI-style function declarations; raise ChatError naming the problem."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ChatError("tools must be a list")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ChatError(f"tools[{i}] must be an object with type 'function'")
        f = tool.get("function")
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ChatError(f"tools[{i}].function.name must be a non-empty string")
        if not all(c.isalnum() or c in "_-." for c in f["name"]):
            raise ChatError(f"tools[{i}].function.name {f['name']!r} may only contain letters, digits, '_', '-', '.'")
        if "description" in f and not isinstance(f["description"], str):
            raise ChatError(f"tools[{i}].function.description must be a string")
        params = f.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise ChatError(f"tools[{i}].function.parameters must be a JSON schema object")
            if params.get("type", "object") != "object":
                raise ChatError(f"tools[{i}].function.parameters.type must be 'object'")
            props = params.get("properties", {})
            if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
                raise ChatError(f"tools[{i}].function.parameters.properties must map names to schemas")
            req = params.get("required", [])
            if not isinstance(req, list) or not all(isinstance(r, str) and r in props for r in req):
                raise ChatError(f"tools[{i}].function.parameters.required must list declared properties")
    return tools


def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages -> the shapes the template reads (see module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list")
    out, call_names = [], {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatError(f"messages[{i}] must be an object with a role")
        role = m["role"]
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ChatError(f"messages[{i}].role {role!r} is not one of system, developer, user, assistant, tool")
        if role in ("system", "developer") and i != 0:
            raise ChatError(f"messages[{i}]: a {role} message is only allowed first")
        m = copy.deepcopy(m)
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ChatError(f"messages[{i}].content must be a string or a list of parts")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "image", "image_url", "video",
                                                                          "video_url"):
                    raise ChatError(f"messages[{i}].content[{j}] must be a text, image or video part")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise ChatError(f"messages[{i}].content[{j}].text must be a string")
                if part["type"] in ("image_url", "video_url"):
                    content[j] = {"type": part["type"].removesuffix("_url")}
        if role == "assistant":
            for key in ("reasoning_content", "reasoning", "thinking"):
                m.pop(key, None)
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ChatError(f"messages[{i}].tool_calls must be a list")
            for j, call in enumerate(calls):
                f = call.get("function") if isinstance(call, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise ChatError(f"messages[{i}].tool_calls[{j}].function.name must be a string")
                args = f.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError as e:
                        raise ChatError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {e}") from None
                if not isinstance(args, dict):
                    raise ChatError(f"messages[{i}].tool_calls[{j}].function.arguments must be an object")
                f["arguments"] = args
                if call.get("id"):
                    call_names[call["id"]] = f["name"]
        if role == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id"))
            if not name:
                raise ChatError(f"messages[{i}]: a tool message needs a name or the tool_call_id of an earlier call")
            m["name"] = name
            if "response" not in m:
                text = content if isinstance(content, str) else "".join(
                    p.get("text", "") for p in (content or []) if isinstance(p, dict))
                try:
                    m["response"] = json.loads(text)
                except (json.JSONDecodeError, TypeError):
                    m["response"] = text
        out.append(m)
    return out
