"""The HTTP layer (FastAPI): OpenAI's endpoints, vLLM's adapter loading, health, metrics and the playground.

It only parses, queues and streams: requests are tokenized on the service's preparing thread, adapters read
on the pool's reader thread, and the model runs in the engine thread, so the event loop never waits on them.
Every error is OpenAI's error JSON with a fitting status (400 for a bad body, not FastAPI's 422), and no
request can stop the server. A client that closes its connection before its answer is complete stops its
sequences, whether it streams or not, and whether they run or still wait.
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
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from loratune.inference.sequence import Delta, Failed, Finished
from loratune.serve.protocol import (
    STRICT,
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
    now,
    parse_body,
    usage,
)
from loratune.serve.service import Job, Service
from loratune.version import __version__

log = logging.getLogger("loratune.serve")
OPEN_PATHS = {"/", "/health", "/favicon.ico"}  # no API key needed: the playground page asks for it
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection (counted, never sent)


class LoadAdapter(BaseModel):
    model_config = STRICT

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(BaseModel):
    model_config = STRICT

    lora_name: str = Field(min_length=1)


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


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


class _Guard:
    """The outermost layer of every request (a plain ASGI middleware): checks the API key, and turns an
    unexpected exception into OpenAI's 500 JSON (once an answer has started, the connection is closed instead).

    Not FastAPI's ``@app.middleware("http")``: its wrapper receives on the handlers' behalf in a task group
    that a zero-timeout poll cancels at once, so a handler never saw its client leave and a non-streaming
    request kept its sequences running to the end."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                refused = _error(
                    401,
                    "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                    "authentication_error",
                    "invalid_api_key",
                )
                await refused(scope, receive, send)
                return
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("request failed: %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            failed = _error(500, "internal error in loratune serve (see the server's log)", "server_error")
            await failed(scope, receive, send)


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``service`` (the engine must be started by the caller)."""
    app = FastAPI(title="loratune serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    app.add_middleware(_Guard, api_key=api_key)

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
    raw = await _body(request, request.app.state.service.max_body_bytes)
    data = parse_body(raw)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        message, field = _validation_message(error.errors())
        raise RequestError(message, param=field) from None


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) as soon as it is known to exceed ``limit`` bytes: by its Content-Length
    before anything is read, or while a body of unannounced length arrives."""
    too_large = RequestError(
        f"the request body is over the server's limit of {limit:,} bytes (loratune serve --max-body-bytes)",
        status=413,
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # left before sending the whole body: nobody reads the answer
        raise RequestError("the client closed the connection before the end of its request body") from None
    return b"".join(chunks)


async def _answer(request: Request, service: Service, body, chat: bool):
    endpoint = "chat_completions" if chat else "completions"
    try:
        job = await service.check(body)  # tokenizing runs off the event loop
        answer = await _unless_disconnected(request, _respond(service, job, body, chat))
    except RequestError as error:
        service.metrics.requests.labels(endpoint, body.model, str(error.status)).inc()
        raise
    except ClientGone:
        service.metrics.requests.labels(endpoint, body.model, str(CLIENT_GONE)).inc()
        return Response(status_code=CLIENT_GONE)  # (the server drops it: the connection is closed)
    status = answer.status_code if isinstance(answer, Response) else 200
    service.metrics.requests.labels(endpoint, body.model, str(status)).inc()
    return answer


async def _respond(service: Service, job: Job, body, chat: bool):
    """The whole answer, or for a stream the response that streams it once its first event is there (errors
    before the first token, a full queue say, keep their status)."""
    events = service.events(job)
    if not body.stream:
        return await _collect(events, job, chat)
    first = await anext(events)
    return StreamingResponse(
        _stream(first, events, job, body, chat),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _unless_disconnected(request: Request, work):
    """Await the coroutine ``work`` while watching the connection: if the client closes it first, ``work`` is
    cancelled (which stops its sequences, queued or running: see ``Service.events``) and ``ClientGone`` is
    raised. A stream's response watches for itself once it is returned (Starlette's ``StreamingResponse``)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself is cancelled (the server stops): so is the work
        task.cancel()
        raise
    finally:
        gone.cancel()  # the stream's own watcher takes over from here
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    raise ClientGone


async def _disconnect(request: Request) -> None:
    """Return when the client has closed the connection. The body has been read, so the server's next message
    is the disconnect (it arrives the moment the connection drops: no polling)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(events, job: Job, chat: bool):
    """Run ``job`` to its end (``events`` are its events) and build the whole answer."""
    count = len(job.prompts) * job.n
    texts, logprobs, reasons = [""] * count, [[] for _ in range(count)], [None] * count
    prompt_tokens = sum(len(p) for p in job.prompts) * job.n
    completion_tokens = 0
    try:
        async for index, event in events:
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
