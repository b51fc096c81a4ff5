"""Test your agents without a model vendor or a key.

- :class:`ScriptedModel`: replies from a list (or a function of the messages),
  without any HTTP. The fastest way to test an agent's tools and flow.
- :class:`FakeOpenAIServer`: an OpenAI-compatible chat-completions server on
  loopback, so the real litellm path is exercised (``model="openai/fake-model"``,
  ``api_base=server.url``).
- :func:`use_models`: the models that runs of each agent use while a block
  runs, sub-agents and long-lived agents' turns included.
- :func:`forbid_model_requests`: refuse every model request that is not to a
  loopback address, so a test suite can never reach (or pay) a real vendor.

    from legion.testing import ScriptedModel

    model = ScriptedModel([
        '{"action": "eval_and_complete", "code": "Calculator.add(2, 3)"}',
    ])
    result = await legion.run(MathAgent, "2 + 3?", model=model)
    assert result.output == 5
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .. import models as _models
from .._ctx import bound
from ..models import Model, ModelReply, Usage
from ._fake_openai import FakeOpenAIServer, Reply

__all__ = [
    "FakeOpenAIServer",
    "Reply",
    "ScriptedModel",
    "action",
    "forbid_model_requests",
    "use_models",
]

ScriptItem = str | Callable[[list[dict[str, str]]], str]


def action(kind: str, code: str | None = None, **fields: Any) -> str:
    """A model reply holding one action, as JSON text:
    ``action("eval_and_continue", "x = 1")``, ``action("return", result=5)``."""
    payload: dict[str, Any] = {"action": kind}
    if code is not None:
        payload["code"] = code
    payload.update(fields)
    return json.dumps(payload)


class ScriptedModel:
    """A model that replies from a script, one item per request.

    Items are reply texts, or functions of the messages sent (to react to
    what the code did). ``script`` may also be one such function, used for every
    request. Every request's messages are kept in ``requests``.
    """

    def __init__(
        self,
        script: Sequence[ScriptItem] | Callable[[list[dict[str, str]]], str],
        *,
        name: str = "scripted",
        tokens_per_reply: int = 10,
    ) -> None:
        self.name = name
        self._script = script
        self._index = 0
        self._tokens = tokens_per_reply
        self.requests: list[list[dict[str, str]]] = []

    @property
    def remaining(self) -> int | None:
        if callable(self._script):
            return None
        return len(self._script) - self._index

    async def complete(self, messages: Sequence[dict[str, str]]) -> ModelReply:
        sent = [dict(m) for m in messages]
        self.requests.append(sent)
        if callable(self._script):
            item: ScriptItem = self._script
        else:
            if self._index >= len(self._script):
                raise AssertionError(
                    f"ScriptedModel: script exhausted after {len(self._script)} replies; the "
                    f"agent asked again. Last message: {sent[-1]['content'][:500]!r}"
                )
            item = self._script[self._index]
            self._index += 1
        text = item(sent) if callable(item) else item
        prompt = sum(len(m["content"]) for m in sent) // 4 + 1
        return ModelReply(
            text, Usage(prompt, self._tokens, prompt + self._tokens, None, 1), self.name
        )


@contextlib.contextmanager
def forbid_model_requests(forbid: bool = True) -> Iterator[None]:
    """Refuse model requests that are not to a loopback ``api_base`` (a
    :class:`legion.UsageError` says so) while the block runs. Also usable as a
    plain call in a conftest: ``forbid_model_requests().__enter__()``."""
    previous = _models._requests_allowed
    _models._requests_allowed = not forbid
    try:
        yield
    finally:
        _models._requests_allowed = previous


@contextlib.contextmanager
def use_models(models: Mapping[str, Model] | Callable[[str], Model | None]) -> Iterator[None]:
    """Runs started in this block (and the sub-agents and turns they start)
    use these models instead of their configured ones: a mapping from agent
    class name to model, or a function of the name (None: keep the configured
    one). A ``model=`` passed to a call still wins.

        with use_models({"Researcher": ScriptedModel([...]), "Writer": ...}):
            await legion.run(Editor, "...")
    """
    choose = models if callable(models) else dict(models).get
    with bound(_models._overrides, choose):
        yield
