"""A request's outputs as HTTP responses: one OpenAI JSON object, or server-sent events (OpenAI chunks, and
draft frames when asked). Both watch the client: one that goes away, or a request past the server's time
limit, is cancelled at once (its cache is freed within a denoising step)."""

from __future__ import annotations

import asyncio
import json

from ..engine import DraftEvent
from ..generation import Result
from ..text.parser import Delta
from .errors import APIError
from .metrics import generation_log
from .protocol import new_id, now, usage


def call_json(call, index: int, delta: bool = False) -> dict:
    d = {"id": new_id("call"), "type": "function",
         "function": {"name": call.name, "arguments": call.arguments_json()}}
    if delta:
        d["index"] = index
    return d


def draft_json(ev: DraftEvent, tokenizer) -> dict:
    ids = ev.argmax.tolist()
    return {"request": ev.request_id, "canvas": ev.canvas, "step": ev.step, "temperature": round(ev.temperature, 4),
            "tokens": [tokenizer.decode([i]) for i in ids], "ids": ids,
            "accepted": ev.accepted.tolist(), "entropy": [round(h, 3) for h in ev.entropy.tolist()],
            "finished": ev.finished_denoising, "committed_tokens": ev.committed_tokens}


def final_json(result: Result, kind: str, name: str) -> dict:
    if kind == "completion":
        return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": name,
                "choices": [{"index": 0, "text": result.content, "finish_reason": result.finish_reason,
                             "logprobs": None}], "usage": usage(result.stats)}
    msg = {"role": "assistant", "content": result.content or (None if result.tool_calls else "")}
    if result.reasoning:
        msg["reasoning_content"] = result.reasoning
    if result.tool_calls:
        msg["tool_calls"] = [call_json(c, i) for i, c in enumerate(result.tool_calls)]
    choice = {"index": 0, "message": msg, "finish_reason": result.chat_finish_reason, "logprobs": None}
    if result.tool_call_errors:
        choice["tool_call_errors"] = result.tool_call_errors
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": name,
            "choices": [choice], "usage": usage(result.stats)}


class Watch:
    """One request's output queue, read while watching the client and the clock."""

    def __init__(self, request, queue: asyncio.Queue, cancel, timeout_s: float, rid: str = ""):
        self.request, self.queue, self.cancel, self.rid = request, queue, cancel, rid
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.timeout_s = timeout_s
        self._gone = asyncio.ensure_future(self._disconnect())

    async def _disconnect(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

    async def next(self):
        """The next output; raises APIError 504 past the deadline, ConnectionAbortedError if the client left
        (the request is cancelled either way)."""
        get = asyncio.ensure_future(self.queue.get())
        left = self.deadline - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait({get, self._gone}, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            out = get.result()
            if isinstance(out, Exception):
                self.close()
                raise APIError(500, str(out), type_="server_error")
            if isinstance(out, Result):  # the request log's details (metrics.Observe writes the line)
                self.request.scope.setdefault("state", {})["log"] = generation_log(self.rid, out)
            return out
        get.cancel()
        self.cancel()
        self.close()
        if self._gone in done:
            raise ConnectionAbortedError
        raise APIError(504, f"the request took longer than this server's limit of {self.timeout_s:g} s",
                       code="timeout")

    def close(self) -> None:
        self._gone.cancel()


async def drain(watch: Watch) -> Result:
    while True:
        out = await watch.next()
        if isinstance(out, Result):
            watch.close()
            return out


async def sse(watch: Watch, kind: str, name: str, include_usage: bool, tokenizer):
    """The stream of one request's outputs as server-sent events."""
    cid, created = new_id("chatcmpl" if kind == "chat" else "cmpl"), now()
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    n_calls = 0

    def chunk(delta=None, finish=None, **extra):
        if kind == "chat":
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        else:
            choices = [] if delta is None else [{"index": 0, "text": delta.get("content", ""), "finish_reason": finish,
                                                 "logprobs": None}]
        return "data: " + json.dumps({"id": cid, "object": obj, "created": created, "model": name,
                                      "choices": choices, **extra}, ensure_ascii=False) + "\n\n"

    def delta_chunk(d: Delta):
        nonlocal n_calls
        if d.kind == "content":
            return chunk({"content": d.text})
        if d.kind == "reasoning" and kind == "chat":
            return chunk({"reasoning_content": d.text})
        if d.kind == "tool_call" and kind == "chat":
            n_calls += 1
            return chunk({"tool_calls": [call_json(d.call, n_calls - 1, delta=True)]})
        return None

    finished = False
    try:
        if kind == "chat":
            yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                out = await watch.next()
            except APIError as e:
                finished = True
                yield "data: " + json.dumps(e.body()) + "\n\n"
                return
            except ConnectionAbortedError:
                return
            if isinstance(out, DraftEvent):
                yield chunk(draft=draft_json(out, tokenizer))
            elif isinstance(out, Delta):
                c = delta_chunk(out)
                if c is not None:
                    yield c
            elif isinstance(out, Result):
                finished = True
                yield chunk({}, finish=out.chat_finish_reason if kind == "chat" else out.finish_reason)
                if include_usage:
                    yield chunk(usage=usage(out.stats))
                yield "data: [DONE]\n\n"
                return
    finally:
        watch.close()
        if not finished:  # the client went away (or the stream was closed): stop generating, free the cache
            watch.cancel()
