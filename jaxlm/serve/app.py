"""The HTTP API (Starlette, run by uvicorn): OpenAI's /v1/models, /v1/completions and
/v1/chat/completions (JSON or server-sent events), /health and Prometheus /metrics, over an
``Engine`` running in its own thread."""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxlm.chat import render
from jaxlm.sampling import SamplingError
from jaxlm.serve.engine import Engine, QueueFull
from jaxlm.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from jaxlm.serve.protocol import (
    CHAT_FIELDS, COMPLETION_FIELDS, APIError, RequestSampling, chat_logprobs, check_fields, completion_logprobs,
    new_id, now, prompts_of, sampling_of, usage,
)

MAX_BODY = 8 << 20  # bytes


def create_app(engine: Engine, *, model_name: str, chat_template: str | None = None,
               drain_timeout: float = 30.0) -> Starlette:
    """The ASGI app. The engine is started with the app and, at shutdown, finishes what is in
    flight (up to ``drain_timeout`` seconds) before it stops."""
    metrics = Metrics(engine)
    engine.metrics = metrics  # time to first token, inter-token latency, tokens generated
    tokenizer = engine.lm.tokenizer
    template = chat_template or (tokenizer.chat_template if tokenizer is not None else None)
    created = now()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.started:
            engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop, drain_timeout)

    def answer(endpoint: str, response: Response) -> Response:
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    def error(endpoint: str, e: APIError) -> Response:
        return answer(endpoint, JSONResponse(e.body(), status_code=e.status, headers=e.headers))

    async def read_body(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise APIError(413, f"the request body has {length} bytes; the limit is {MAX_BODY}")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise APIError(413, f"the request body has {len(raw)} bytes; the limit is {MAX_BODY}")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def check_model(body: dict) -> None:
        name = body.get("model", model_name)
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found")

    def encode(prompt) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")
        return tokenizer.encode(prompt, add_special_tokens=False)

    def submit_all(rows: list[list[int]], request: RequestSampling, on_event) -> list:
        """Check every prompt first (nothing is queued if one is bad), then queue them all."""
        sampling = request.sampling
        for ids in rows:
            try:
                sampling = engine.check(len(ids), request.sampling, request.names)
            except SamplingError as e:
                long = "does not fit" in str(e)
                raise APIError(400, str(e), param=e.param, code="context_length_exceeded" if long else None) from None
            except ValueError as e:
                raise APIError(400, str(e), code="context_length_exceeded" if "prompt has" in str(e) else None) from None
        requests = []
        try:
            for i, ids in enumerate(rows):
                requests.append(engine.submit(ids, sampling, on_event=lambda e, i=i: on_event(i, e)))
        except QueueFull as e:
            for r in requests:
                r.cancel()
            closing = engine.closing
            raise APIError(503 if closing else 429, str(e), kind="server_error" if closing else "rate_limit_error",
                           headers={} if closing else {"Retry-After": "1"}) from None
        except ValueError as e:
            for r in requests:
                r.cancel()
            raise APIError(400, str(e)) from None
        except RuntimeError as e:  # the engine's loop died (its error is on /health too)
            raise APIError(503, str(e), kind="server_error") from None
        return requests

    async def run(endpoint: str, request: Request, body: dict, rows: list[list[int]], asked: RequestSampling,
                  chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        requests = submit_all(rows, asked, lambda i, e: loop.call_soon_threadsafe(events.put_nowait, (i, e)))
        metrics.prompt_tokens.inc(sum(len(r) for r in rows))
        n = requests[0].n
        total = len(rows) * n
        rid, model = new_id("chatcmpl" if chat else "cmpl"), model_name
        kind = "chat.completion" if chat else "text_completion"

        def usage_now():
            return usage(sum(len(r) for r in rows), sum(len(c.token_ids) for q in requests for c in q.choices))

        if not body.get("stream"):
            try:
                left = total
                while left:
                    try:
                        _, e = await asyncio.wait_for(events.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            raise asyncio.CancelledError from None
                        continue
                    left -= e.finish_reason is not None
            finally:
                for q in requests:
                    if not q.done:
                        q.cancel()
            if any(c.finish_reason == "error" for q in requests for c in q.choices):
                return error(endpoint, APIError(500, f"generation failed: {engine.error!r}", kind="server_error"))
            choices = []
            for i, q in enumerate(requests):
                for c in q.choices:
                    want = q.logprobs is not None
                    if chat:
                        choices.append({"index": i * n + c.index, "message": {"role": "assistant", "content": c.text},
                                        "logprobs": chat_logprobs(tokenizer, c.token_ids, c.logprobs, c.top_logprobs)
                                        if want else None, "finish_reason": c.finish_reason})
                    else:
                        choices.append({"index": i * n + c.index, "text": c.text, "finish_reason": c.finish_reason,
                                        "logprobs": completion_logprobs(tokenizer, c.token_ids, c.logprobs,
                                                                        c.top_logprobs) if want else None})
            return answer(endpoint, JSONResponse({"id": rid, "object": kind, "created": now(), "model": model,
                                                  "choices": choices, "usage": usage_now()}))

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def stream():
            kind_chunk = "chat.completion.chunk" if chat else "text_completion"
            started, offsets, left = set(), {}, total

            def chunk(choice: dict, last_usage=None):
                d = {"id": rid, "object": kind_chunk, "created": now(), "model": model, "choices": [choice]}
                if last_usage is not None:
                    d["usage"] = last_usage
                return f"data: {json.dumps(d)}\n\n"

            try:
                while left:
                    i, e = await events.get()
                    index = i * n + e.choice
                    want = requests[i].logprobs is not None and e.token is not None
                    top = (e.top_logprobs,) if want else ()
                    if chat:
                        if index not in started:
                            started.add(index)
                            yield chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None})
                        if e.finish_reason is None and not e.text and not want:
                            continue
                        delta = {"content": e.text} if e.text else {}
                        lp = chat_logprobs(tokenizer, [e.token], [e.logprob], top) if want else None
                    else:
                        if e.finish_reason is None and not e.text and not want:
                            continue
                        lp = (completion_logprobs(tokenizer, [e.token], [e.logprob], top, offsets.get(index, 0))
                              if want else None)
                        offsets[index] = offsets.get(index, 0) + len(e.text)
                    left -= e.finish_reason is not None
                    reason = e.finish_reason if e.finish_reason in (None, "stop", "length") else "stop"
                    choice = {"index": index, **({"delta": delta} if chat else {"text": e.text}), "logprobs": lp,
                              "finish_reason": reason}
                    last = usage_now() if not left and not include_usage else None
                    yield chunk(choice, last)
                if include_usage:
                    d = {"id": rid, "object": kind_chunk, "created": now(), "model": model, "choices": [],
                         "usage": usage_now()}
                    yield f"data: {json.dumps(d)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for q in requests:  # the client went away (or we are done): free the slots
                    if not q.done:
                        q.cancel()

        return answer(endpoint, StreamingResponse(stream(), media_type="text/event-stream",
                                                  headers={"Cache-Control": "no-cache"}))

    def endpoint(path: str, fields: set[str], prepare):
        """A POST handler: read and check the body, ``prepare(body) -> (prompt rows, args)``, run;
        any APIError becomes OpenAI's error object."""
        async def handle(request: Request) -> Response:
            try:
                body = await read_body(request)
                check_fields(body, fields)
                check_model(body)
                rows, asked = prepare(body)
                return await run(path, request, body, rows, asked, chat=fields is CHAT_FIELDS)
            except APIError as e:
                return error(path, e)
        return handle

    def completion_rows(body: dict):
        return [encode(p) for p in prompts_of(body)], sampling_of(body, chat=False, default_max_tokens=16)

    def chat_rows(body: dict):
        if template is None:
            raise APIError(400, "this model has no chat template (tokenizer_config.json has no chat_template); "
                                "start the server with --chat-template FILE, or use /v1/completions")
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        try:
            text = render(template, body.get("messages"), **tokenizer.special_tokens)
        except ValueError as e:  # bad messages, or the template refused them (ChatTemplateError)
            raise APIError(400, str(e), param="messages") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        room = engine.max_len - engine.lm.config.prompt_length - len(ids)
        return [ids], sampling_of(body, chat=True, default_max_tokens=max(room, 1))

    async def models(request: Request) -> Response:
        return answer("/v1/models", JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "jaxlm",
             "max_model_len": engine.max_len}]}))

    async def health(request: Request) -> Response:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "slots_in_use": engine.slots_in_use,
                             "queue_depth": engine.queue_depth}, status_code=200 if ok else 503)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc) -> Response:
        e = APIError(404, f"no route {request.method} {request.url.path}")
        return JSONResponse(e.body(), status_code=404)

    async def bad_method(request: Request, exc) -> Response:
        e = APIError(405, f"{request.method} is not allowed on {request.url.path}")
        return JSONResponse(e.body(), status_code=405)

    routes = [Route("/v1/models", models, methods=["GET"]),
              Route("/v1/completions", endpoint("/v1/completions", COMPLETION_FIELDS, completion_rows), methods=["POST"]),
              Route("/v1/chat/completions", endpoint("/v1/chat/completions", CHAT_FIELDS, chat_rows), methods=["POST"]),
              Route("/health", health, methods=["GET"]), Route("/metrics", prometheus, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: bad_method})
    app.state.engine, app.state.metrics = engine, metrics
    return app
