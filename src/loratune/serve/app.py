"""The HTTP layer (FastAPI): OpenAI's endpoints, vLLM's adapter loading, health, metrics and the playground.

It only parses, queues and streams: requests are tokenized on the service's preparing thread, adapters read
on the pool's reader thread, and the model runs in the engine thread, so the event loop never waits on them.
Every error is OpenAI's error JSON with a fitting status (400 for a bad body, not FastAPI's 422), and no
request can stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loratune.inference.sequence import Delta, Failed, Finished
from loratune.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
    now,
    usage,
)
from loratune.serve.service import Job, Service
from loratune.version import __version__

log = logging.getLogger("loratune.serve")
OPEN_PATHS = {"/", "/health", "/favicon.ico"}  # no API key needed: the playground page asks for it


class LoadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)


def _error(status: int, message: str, kind: str = "invalid_request_error", code=None, param=None, headers=None):
    return JSONResponse(error_body(message, kind, code, param), status_code=status, headers=headers)


def _request_error(error: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    return _error(error.status, str(error), error.kind, error.code, error.param, headers)


def _validation_message(errors) -> tuple[str, str | None]:
    first = errors[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(where) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return (f"{field}: {message}" if field else message), field


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``service`` (the engine must be started by the caller)."""
    app = FastAPI(title="loratune serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(
                    401,
                    "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                    "authentication_error",
                    "invalid_api_key",
                )
        try:
            return await call_next(request)
        except Exception:
            log.exception("request failed: %s %s", request.method, request.url.path)
            return _error(500, "internal error in loratune serve (see the server's log)", "server_error")

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError):
        message, field = _validation_message(error.errors())
        return _error(400, message, param=field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error(error.status_code, str(error.detail), kind)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return _request_error(error)

    @app.get("/health")
    async def health():
        return {"status": "draining" if service.draining else "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files("loratune.serve").joinpath("static/playground.html").read_text("utf-8"))

    @app.get("/v1/models")
    async def models():
        created = now()
        data = [
            {
                "id": service.base_id,
                "object": "model",
                "created": created,
                "owned_by": "loratune",
                "parent": None,
                "root": service.base_id,
            }
        ]
        data += [
            {
                "id": a.name,
                "object": "model",
                "created": created,
                "owned_by": "loratune",
                "parent": service.base_id,
                "root": str(a.path),
            }
            for a in service.pool.listed()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        return await _answer(request, service, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatCompletionRequest)
        return await _answer(request, service, body, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await _parse(request, LoadAdapter)
        await service.pool.load(body.lora_name, body.lora_path)
        service.metrics.requests.labels("load_lora_adapter", body.lora_name, "200").inc()
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await _parse(request, UnloadAdapter)
        await service.pool.unload(body.lora_name)
        service.metrics.requests.labels("unload_lora_adapter", body.lora_name, "200").inc()
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    return app


async def _parse(request: Request, model: type[BaseModel]):
    """The JSON body as ``model``; a body that is not JSON, or not what ``model`` needs, is a 400."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        message, field = _validation_message(error.errors())
        raise RequestError(message, param=field) from None


async def _answer(request: Request, service: Service, body, chat: bool):
    endpoint = "chat_completions" if chat else "completions"
    try:
        job = await service.check(body)  # tokenizing runs off the event loop
        if body.stream:
            events = service.events(job)
            first = await anext(events)  # errors before the first token (a full queue, say) keep their status
            answer = StreamingResponse(
                _stream(first, events, job, body, chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        else:
            answer = await _collect(request, service, job, chat)
    except RequestError as error:
        service.metrics.requests.labels(endpoint, body.model, str(error.status)).inc()
        raise
    status = answer.status_code if isinstance(answer, JSONResponse) else 200
    service.metrics.requests.labels(endpoint, body.model, str(status)).inc()
    return answer


async def _collect(request: Request, service: Service, job: Job, chat: bool):
    """Run ``job`` to its end and build the whole answer; stop if the client goes away."""
    count = len(job.prompts) * job.n
    texts, logprobs, reasons = [""] * count, [[] for _ in range(count)], [None] * count
    prompt_tokens = sum(len(p) for p in job.prompts) * job.n
    completion_tokens = 0
    events = service.events(job)
    try:
        async for index, event in _until_disconnected(request, events):
            if isinstance(event, Delta):
                texts[index] += event.text
                logprobs[index] += event.logprobs
            elif isinstance(event, Finished):
                reasons[index] = event.reason
                completion_tokens += event.completion_tokens
            elif isinstance(event, Failed):
                return _error(event.status, event.message, event.kind)
    finally:
        await events.aclose()
    wants_logprobs = job.params.logprobs is not None
    if chat:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts[i]},
                "logprobs": {"content": chat_logprobs(job.tokenizer, logprobs[i])} if wants_logprobs else None,
                "finish_reason": reasons[i],
            }
            for i in range(count)
        ]
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        choices = [
            {
                "index": i,
                "text": texts[i],
                "logprobs": completion_logprobs(job.tokenizer, logprobs[i], 0) if wants_logprobs else None,
                "finish_reason": reasons[i],
            }
            for i in range(count)
        ]
        kind, prefix = "text_completion", "cmpl"
    return {
        "id": new_id(prefix),
        "object": kind,
        "created": now(),
        "model": job.model_name,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


async def _until_disconnected(request: Request, events):
    """``events``, ending early when the client has closed its connection (checked between events)."""
    pending = None
    while True:
        if pending is None:
            pending = asyncio.ensure_future(anext(events))
        done, _ = await asyncio.wait({pending}, timeout=0.5)
        if pending in done:
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
        elif await request.is_disconnected():
            pending.cancel()
            return


async def _stream(first, events, job: Job, body, chat: bool):
    """Server-Sent Events for ``job``: a chunk per delta, one with each choice's finish reason, the usage
    chunk when asked, then ``[DONE]``. Closing the connection cancels the generation."""
    ident, created = new_id("chatcmpl" if chat else "cmpl"), now()
    kind = "chat.completion.chunk" if chat else "text_completion"
    wants_logprobs = job.params.logprobs is not None
    offsets = [0] * (len(job.prompts) * job.n)
    completion_tokens = 0

    def chunk(choices: list, **extra) -> str:
        payload = {
            "id": ident,
            "object": kind,
            "created": created,
            "model": job.model_name,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def piece(index: int, text: str | None, entries, reason=None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            lp = {"content": chat_logprobs(job.tokenizer, entries)} if wants_logprobs and entries else None
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
        lp = completion_logprobs(job.tokenizer, entries, offsets[index]) if wants_logprobs and entries else None
        return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": reason}

    try:
        if chat:
            yield chunk(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(len(offsets))
                ]
            )
        item = first
        while item is not None:
            index, event = item
            if isinstance(event, Delta):
                yield chunk([piece(index, event.text, event.logprobs)])
                offsets[index] += len(event.text)
            elif isinstance(event, Finished):
                completion_tokens += event.completion_tokens
                yield chunk([piece(index, None, (), event.reason)])
            elif isinstance(event, Failed):
                yield f"data: {json.dumps(error_body(event.message, event.kind, event.status))}\n\n"
                break
            item = await anext(events, None)
        else:
            if body.include_usage:
                prompt_tokens = sum(len(p) for p in job.prompts) * job.n
                yield chunk([], usage=usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
