"""The generator: a loaded checkpoint's engine with text on both sides. Prompts in (chat messages, raw text,
or token ids), outputs out (draft frames, content / reasoning / tool-call deltas, a final `Result`).

Three ways to drive it, all over the same engine and the same per-request `TextRequest`:
- `run(prompts, ...)`: many requests batched together, their `Result`s in order (evaluation, tests);
- `stream(prompt, ...)`: one request's outputs as they come (the command line);
- `submit(...)` then `step()` in a loop: a server's engine thread, each step's outputs by request id.

Everything the CLI, the server, the evaluation and the benchmarks do with text goes through here.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator, Sequence

from ..engine import Engine, RequestError, SamplingParams
from .lockstep import Lockstep
from .output import Output, OutputOptions, Result, TextRequest
from .prompt import Prompt, PromptBuilder
from .structured import Grammars


class Generator:
    def __init__(self, checkpoint, engine: Engine | None = None, lockstep: bool = False, **engine_kw):
        """checkpoint: a `load()`ed directory with a tokenizer. engine: an engine built for it (default: one
        with `engine_kw`, e.g. `max_batch`, `runner`).

        lockstep: with a tensor-parallel model, rank 0 takes the requests and the other ranks follow it
        (`generation.lockstep`: a server). Without it every rank is expected to make the same calls itself (a
        program run on every rank alike: generate, chat, eval)."""
        self.checkpoint = checkpoint
        self.prompts = PromptBuilder.of(checkpoint)
        self.tokenizer = checkpoint.tokenizer
        self.engine = engine or Engine.from_checkpoint(checkpoint, **engine_kw)
        self._requests: dict[str, TextRequest] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.grammars = Grammars(self.tokenizer, checkpoint.config.text.vocab_size,
                                 checkpoint.generation_config.eos_token_id)
        self._compiled: dict[str, str] = {}  # schema (JSON) -> grammar
        tp = checkpoint.model.tp
        self.lockstep = Lockstep(self, tp) if lockstep and tp.active else None

    # -- prompts ---------------------------------------------------------------------------------------
    def chat(self, messages, tools=None, thinking: bool = False, policy=None, tool_choice="auto") -> Prompt:
        return self.prompts.chat(messages, tools, thinking, policy, tool_choice)

    def text(self, text: str) -> Prompt:
        return self.prompts.text(text)

    # -- requests --------------------------------------------------------------------------------------
    def submit(self, prompt: Prompt | Sequence[int], params: SamplingParams | None = None,
               options: OutputOptions | None = None, request_id: str | None = None) -> str:
        """Queue a request (a `Prompt`, or token ids); returns its id. Raises RequestError naming a bad setting.
        Tensor parallel (rank 0): the request reaches the other ranks with the next step (`lockstep`)."""
        prompt = prompt if isinstance(prompt, Prompt) else Prompt(list(prompt))
        options = options or OutputOptions()
        if self.lockstep is None:
            return self.submit_local(prompt, params, options, request_id)
        with self.lockstep.lock():  # the request and its record for the other ranks, in the same order
            rid = self.submit_local(prompt, params, options, request_id or f"gen-{next(self._ids)}")
            self.lockstep.submitted((prompt, params, options, rid))
        return rid

    def submit_local(self, prompt: Prompt, params: SamplingParams | None, options: OutputOptions,
                     request_id: str | None) -> str:
        """`submit` on this process alone."""
        constraint = self._constraint(options, prompt, params)
        rid = request_id or f"gen-{next(self._ids)}"
        tr = TextRequest(rid, self.tokenizer, options, prompt.forced)
        with self._lock:
            self._requests[rid] = tr  # registered before the engine can report anything of it
        try:
            self.engine.add(prompt.ids, params, request_id=rid, hook=tr.hook, images=prompt.images or None,
                            draft=options.draft, constraint=constraint)
        except Exception:
            with self._lock:
                self._requests.pop(rid, None)
            raise
        return rid

    def _constraint(self, options: OutputOptions, prompt: Prompt, params: SamplingParams | None):
        """The grammar a request's answer must follow: its response_format's schema, or its forced tool call
        (tool_choice "required" or a named function) with the tool's parameter schema."""
        schema = options.schema
        if schema is None and prompt.tool_call is None:
            return None
        field = "response_format" if schema is not None else "tool_choice"
        if schema is not None and prompt.tool_call is not None:
            raise RequestError("response_format cannot be combined with a forced tool call (tool_choice)", field)
        if params is not None and params.stop_token_ids is not None:
            raise RequestError(f"{field} ends the answer with the checkpoint's stop ids: a request's own "
                               "stop_token_ids cannot be combined with it", field)
        if schema is None and (options.stop or options.thinking_budget is not None):
            raise RequestError("a forced tool call cannot be combined with stop strings or a thinking budget", field)
        key = json.dumps(schema if schema is not None else prompt.tool_call, sort_keys=True)
        if key not in self._compiled:
            self._compiled[key] = (self.grammars.compile(schema) if schema is not None
                                   else self.grammars.compile_tool_call(*prompt.tool_call))
        return self.grammars.constraint(self._compiled[key])

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step (its cache is freed; it finishes with `cancelled`)."""
        if self.lockstep is not None:
            self.lockstep.cancel(request_id)
        else:
            self.engine.cancel(request_id)

    def has_work(self) -> bool:
        return self.engine.has_work()

    def step(self) -> list[tuple[str, Output]]:
        """One engine step; the outputs it produced, by request id. A request's `Result` is its last output.
        Tensor parallel: rank 0 first tells the other ranks what arrived and to step (`lockstep`)."""
        if self.lockstep is not None:
            self.lockstep.sync(step=True)
        return self.step_local()

    def idle(self) -> None:
        """Nothing to step (rank 0 of a tensor-parallel group: the other ranks hear that it is alive)."""
        if self.lockstep is not None:
            self.lockstep.sync(step=False)

    def step_local(self) -> list[tuple[str, Output]]:
        out = []
        for ev in self.engine.step():
            with self._lock:
                tr = self._requests.get(ev.request_id)
            if tr is None:  # a request added to the engine directly, not through this generator
                continue
            for o in tr.outputs(ev):
                out.append((ev.request_id, o))
                if isinstance(o, Result):
                    with self._lock:
                        self._requests.pop(ev.request_id, None)
        return out

    def fail_all(self) -> list[str]:
        """Cancel and forget every request of this generator (after a failed step); returns their ids."""
        with self._lock:
            ids, self._requests = list(self._requests), {}
        for rid in ids:
            self.engine.cancel(rid)
        return ids

    # -- conveniences ----------------------------------------------------------------------------------
    def stream(self, prompt: Prompt | Sequence[int], params: SamplingParams | None = None,
               options: OutputOptions | None = None) -> Iterator[Output]:
        """One request's outputs as they come, ending with its `Result`. For a generator with one consumer:
        outputs of other requests stepped meanwhile are not kept."""
        rid = self.submit(prompt, params, options)
        while self.has_work():
            for r, o in self.step():
                if r == rid:
                    yield o
                    if isinstance(o, Result):
                        return

    def run(self, prompts: Sequence[Prompt | Sequence[int]],
            params: SamplingParams | Sequence[SamplingParams | None] | None = None,
            options: OutputOptions | Sequence[OutputOptions | None] | None = None) -> list[Result]:
        """Many requests batched together (each finishing on its own); their results in order."""
        n = len(prompts)
        plist = params if isinstance(params, (list, tuple)) else [params] * n
        olist = options if isinstance(options, (list, tuple)) else [options] * n
        ids = [self.submit(p, sp, op) for p, sp, op in zip(prompts, plist, olist)]
        done: dict[str, Result] = {}
        while len(done) < n and self.has_work():
            for rid, o in self.step():
                if isinstance(o, Result):
                    done[rid] = o
        return [done[i] for i in ids]
