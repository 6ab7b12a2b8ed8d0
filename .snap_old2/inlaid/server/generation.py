"""Serving one completion or chat request: parse, tokenize, admit, stream or collect.

Invariants:
- Every failure before admission is an ``APIError`` (status + OpenAI body); after
  admission a failure ends the stream with an error event and ``[DONE]`` (SSE)
  or a 500 (non-streamed).
- A client that disconnects aborts its request: streams through Starlette's
  disconnect listener cancelling the body iterator, non-streamed requests
  through a watcher on ``receive()``. Either way ``RequestStream.abort`` runs.
- Each admitted request is counted once in the metrics when it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from inlaid.engine.async_llm import AsyncLLM, RequestStream
from inlaid.outputs import RequestOutput
from inlaid.server import protocol
from inlaid.server.errors import APIError, error_body, from_exception
from inlaid.server.metrics import UNKNOWN, ServerMetrics

logger = logging.getLogger(__name__)


async def parse_body(request: Request, model_cls: type[BaseModel]) -> Any:
    """Decode UTF-8, parse JSON, validate the shape: 400 / 400 / 422 on failure."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (bad byte at offset {exc.start})", "invalid_utf8")
    try:
        obj = json.loads(text)
        json.dumps(obj, ensure_ascii=False).encode("utf-8")  # lone surrogates from \ud800 escapes
    except json.JSONDecodeError as exc:
        raise APIError(400, f"malformed JSON body: {exc}", "invalid_json")
    except UnicodeEncodeError:
        raise APIError(400, "request body contains an invalid Unicode escape (lone surrogate)", "invalid_utf8")
    if not isinstance(obj, dict):
        raise APIError(422, "request body must be a JSON object", "validation_error")
    try:
        return model_cls.model_validate(obj)
    except ValidationError as exc:
        errs = exc.errors()
        parts = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in errs[:5]]
        param = ".".join(str(x) for x in errs[0]["loc"]) if errs else None
        raise APIError(422, "invalid request: " + "; ".join(parts), "validation_error", param)


@dataclass
class _Job:
    """One admitted request and what the response needs."""

    kind: protocol.Kind
    rid: str
    model: str
    label: str
    stream: RequestStream
    prompt_tokens: int
    include_usage: bool
    start: float
    first_token: float | None = None


class GenerationHandler:
    """Serves /v1/completions and /v1/chat/completions over one AsyncLLM."""

    def __init__(self, llm: AsyncLLM, metrics: ServerMetrics) -> None:
        self.llm, self.metrics = llm, metrics
        # Without a tokenizer (dummy-shape models) every delta_text is "": stream one empty-text chunk per
        # step that adds tokens, so clients still see when tokens arrive (TTFT/TPOT at the client).
        self.chunk_per_step = getattr(llm.engine, "tokenizer", True) is None

    async def handle(self, request: Request, kind: protocol.Kind) -> Response:
        label = UNKNOWN
        try:
            cls = protocol.CompletionRequest if kind == "completion" else protocol.ChatCompletionRequest
            req = await parse_body(request, cls)
            label = req.model if await self._model_exists(req.model) else UNKNOWN
            job = await self._admit(kind, req, label)
        except Exception as exc:
            err = from_exception(exc)
            if err.status >= 500:
                logger.warning("request refused: %s", err.message)
            self.metrics.observe_rejected(label, err.status)
            return JSONResponse(error_body(err.status, err.message, err.code, err.param), status_code=err.status)
        if req.stream:
            return StreamingResponse(self._sse(job), media_type="text/event-stream")
        return await self._collect(request, job)

    async def _model_exists(self, name: str) -> bool:
        return name == self.llm.model_name or name in await self.llm.list_adapters()

    async def _prompt_ids(self, kind: protocol.Kind, req: Any) -> list[int]:
        if kind == "chat":
            return await self.llm.encode_chat(req.template_messages())
        prompt = req.single_prompt()
        ids = await self.llm.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty: give a non-empty string or at least one token id")
        return ids

    async def _admit(self, kind: protocol.Kind, req: Any, label: str) -> _Job:
        start = time.monotonic()
        if label == UNKNOWN:
            raise APIError(404, f"model {req.model!r} does not exist; GET /v1/models lists the served models",
                           "model_not_found", "model")
        adapter = None if req.model == self.llm.model_name else req.model
        ids = await self._prompt_ids(kind, req)
        limit = self.llm.max_model_len
        max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's completions default
        if kind == "chat":
            max_tokens = req.max_completion_tokens or req.max_tokens or max(limit - len(ids), 1)
        params = protocol.to_sampling_params(req, max_tokens)
        if len(ids) + params.max_tokens > limit:
            raise APIError(400, f"this model's context length is {limit} tokens, but the prompt has {len(ids)} "
                           f"tokens and max_tokens is {params.max_tokens}; shorten the prompt or lower max_tokens",
                           "context_length_exceeded", "max_tokens")
        rid = protocol.new_id("cmpl" if kind == "completion" else "chatcmpl")
        stream = await self.llm.add_request(rid, ids, params, adapter)
        usage_opt = bool(req.stream_options and req.stream_options.include_usage)
        return _Job(kind, rid, req.model, label, stream, len(ids), usage_opt, start)

    def _record(self, job: _Job, last: RequestOutput | None, status: str) -> None:
        gen = last.num_output_tokens if last else 0
        ttft = None if job.first_token is None else job.first_token - job.start
        self.metrics.observe_finished(job.label, status, job.prompt_tokens, gen, time.monotonic() - job.start, ttft)

    def _note(self, job: _Job, out: RequestOutput) -> None:
        if job.first_token is None and out.token_ids:
            job.first_token = time.monotonic()

    async def _collect(self, request: Request, job: _Job) -> Response:
        last: RequestOutput | None = None

        async def consume() -> None:
            nonlocal last
            async for out in job.stream:
                self._note(job, out)
                last = out

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():  # client gone (or we were cancelled): abort
                task.cancel()
                job.stream.abort()
        if not task.done() or task.cancelled():
            self._record(job, last, "abort")
            return Response(status_code=499)
        if task.exception() is not None or last is None or last.finish_reason == "error":
            err = from_exception(task.exception() or RuntimeError(last.error if last else "no output"))
            self._record(job, last, "error")
            return JSONResponse(error_body(500, err.message, "engine_error"), status_code=500)
        self._record(job, last, last.finish_reason or "stop")
        use = protocol.usage(job.prompt_tokens, last.num_output_tokens)
        return JSONResponse(protocol.response_body(job.kind, job.rid, job.model, last.text, last.finish_reason, use))

    async def _sse(self, job: _Job) -> AsyncIterator[str]:
        last: RequestOutput | None = None
        status = "abort"
        try:
            if job.kind == "chat":
                yield _event(protocol.chunk_body("chat", job.rid, job.model, {"role": "assistant", "content": ""}, None))
            async for out in job.stream:
                self._note(job, out)
                last = out
                if out.finish_reason == "error":
                    raise RuntimeError(out.error or "the engine failed this request")
                for chunk in self._chunks(job, out):
                    yield _event(chunk)
            status = last.finish_reason if last and last.finish_reason else "stop"
            if job.include_usage:
                body = protocol.chunk_body(job.kind, job.rid, job.model, None, None)
                body["usage"] = protocol.usage(job.prompt_tokens, last.num_output_tokens if last else 0)
                yield _event(body)
        except Exception as exc:  # after headers: report in-band
            status = "error"
            err = from_exception(exc)
            yield _event(error_body(err.status, err.message, err.code))
        finally:
            job.stream.abort()  # no-op when finished; aborts on disconnect/cancel
            self._record(job, last, status)
        yield "data: [DONE]\n\n"

    def _chunks(self, job: _Job, out: RequestOutput) -> list[dict]:
        chunks = []
        if out.delta_text or (self.chunk_per_step and out.delta_token_ids and not out.finished):
            delta: Any = out.delta_text if job.kind == "completion" else {"content": out.delta_text}
            chunks.append(protocol.chunk_body(job.kind, job.rid, job.model, delta, None))
        if out.finished:
            empty: Any = "" if job.kind == "completion" else {}
            chunks.append(protocol.chunk_body(job.kind, job.rid, job.model, empty, out.finish_reason))
        return chunks


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _wait_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
