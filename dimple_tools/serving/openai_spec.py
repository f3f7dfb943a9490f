"""The HTTP side (`DimpleOpenAISpec`): OpenAI's chat-completions routes with Dimple's settings, errors,
usage, `/v1/models`, `/metrics` and client disconnects."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
import uuid
from typing import Optional


from fastapi import BackgroundTasks, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from litserve.specs.openai import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamingChoice,
    ChatMessage,
    ChoiceDelta,
    OpenAISpec,
    UsageInfo,
)
from litserve.utils import LitAPIStatus

from dimple_tools.serving.request import DimpleChatRequest
from dimple_tools.serving.errors import RequestError, error_body
from dimple_tools.serving.state import SharedState

logger = logging.getLogger("dimple.serve")


class DimpleUsage(UsageInfo):
    forward_passes: int = 0


class DimpleChatCompletionChunk(ChatCompletionChunk):
    usage: Optional[DimpleUsage] = None


class DimpleChatCompletionResponse(ChatCompletionResponse):
    usage: DimpleUsage


# (Starlette request, Dimple request id) of the chat completion being handled: get_from_queues and
# non_streaming_completion, which LitServe's chat_completion calls, watch that client for a disconnect.
_HTTP_REQUEST: contextvars.ContextVar = contextvars.ContextVar("dimple_http_request", default=(None, None))


class _ClientGone(Exception):
    pass


class _Pipe:
    """A request's stream of items from the worker (LitServe's response buffer entry), released when done."""

    def __init__(self, spec: "DimpleOpenAISpec", uid, stream):
        self.spec, self.uid, self.stream, self.pending = spec, uid, stream, []

    async def next(self, http_request: Optional[Request] = None):
        """The next (data, status), or None at the end. With `http_request`, raises _ClientGone when its client
        disconnects meanwhile (checked every 0.1 s)."""
        if self.pending:
            return self.pending.pop(0)
        task = asyncio.ensure_future(self.stream.__anext__())
        try:
            while True:
                finished, _ = await asyncio.wait({task}, timeout=0.1)
                if finished:
                    try:
                        return task.result()
                    except StopAsyncIteration:
                        return None
                if http_request is not None and await http_request.is_disconnected():
                    raise _ClientGone()
        finally:
            if not task.done():
                task.cancel()

    def close(self):
        self.spec.response_buffer.pop(self.uid, None)


def _item(data, status, queue_timeout: Optional[float] = None) -> dict:
    """A worker item (JSON) as a dict; a failure of LitServe's loop as an error item: its 504 (the request
    waited in the queue past the server's timeout) says so, anything else is a 500 without internals."""
    if status == LitAPIStatus.ERROR:
        code = getattr(data, "status_code", None)
        if code == 504:
            waited = f" ({queue_timeout:g} s)" if queue_timeout is not None else ""
            error = RequestError(f"the request waited longer than --queue-timeout{waited} in the queue", None,
                                 "queue_timeout", 504, "timeout")
        else:
            logger.error("the worker loop failed: %r", data)
            error = RequestError("internal server error (the server's log has the cause)", None, "internal_error",
                                 code if isinstance(code, int) and code >= 500 else 500)
        return {"content": "", "dimple_error": error.as_dict()}
    return json.loads(data)


class DimpleOpenAISpec(OpenAISpec):
    """LitServe's `OpenAISpec` with Dimple's request fields, OpenAI-format errors (400 naming the field),
    `usage.forward_passes` and `finish_reason`, client disconnects passed on to the worker, `/v1/models` and
    `/metrics`."""

    def __init__(self, model_id: str, shared: SharedState, model_info: Optional[dict] = None,
                 queue_timeout: Optional[float] = None):
        super().__init__()
        self.model_id, self.shared, self.model_info = model_id, shared, dict(model_info or {})
        self.queue_timeout = queue_timeout  # LitServer's timeout, named in its 504
        self.created = int(time.time())

    def pre_setup(self, lit_api):
        super().pre_setup(lit_api)
        self.add_endpoint("/v1/models", self.list_models, ["GET"])
        self.add_endpoint("/metrics", self.metrics, ["GET"])

    async def list_models(self):
        entry = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "dimple",
                 **self.model_info}
        return {"object": "list", "data": [entry]}

    async def metrics(self):
        totals = await asyncio.to_thread(self.shared.totals)
        lines = []
        for name, value in totals.items():
            lines += [f"# TYPE dimple_{name}_total counter", f"dimple_{name}_total {value}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    def _cancel(self, request_id: Optional[str]) -> None:
        if request_id:
            self.shared.cancel(request_id)

    async def chat_completion(self, request: DimpleChatRequest, background_tasks: BackgroundTasks,
                              http_request: Request):
        if not request.model:  # OpenAI refuses it too: a client that forgot it would otherwise not notice
            raise RequestError(f"model: is required (this server serves {self.model_id!r})", "model",
                               "missing_required_parameter")
        if request.model != self.model_id:
            raise RequestError(f"model: this server serves {self.model_id!r}, not {request.model!r}", "model",
                               "model_not_found")
        if request.n not in (None, 1):
            raise RequestError(f"n: only 1 choice per request is supported, got {request.n}", "n", "invalid_value")
        if request.stream_options is not None and not request.stream:
            raise RequestError("stream_options: only allowed when stream is true", "stream_options",
                               "invalid_value")
        request.model = self.model_id
        request.dimple_request_id = uuid.uuid4().hex
        _HTTP_REQUEST.set((http_request, request.dimple_request_id))
        return await super().chat_completion(request, background_tasks)

    async def get_from_queues(self, uids) -> list:
        """LitServe's per-request streams, after the worker's first item: a refused request raises its 400 here,
        before any response (streaming or not) has started."""
        http_request, request_id = _HTTP_REQUEST.get()
        pipes = [_Pipe(self, uid, self.data_streamer(q, event, send_status=True))
                 for uid, q, event in zip(uids, self.queues, self.events)]
        for pipe in pipes:
            try:
                first = await pipe.next(http_request)
            except _ClientGone:  # it left while its request waited: the worker skips it
                for p in pipes:
                    p.close()
                self._cancel(request_id)
                raise RequestError("client disconnected", None, "client_disconnected", 499)
            if first is not None:
                item = _item(*first, self.queue_timeout)
                if "dimple_error" in item:
                    for p in pipes:
                        p.close()
                    raise RequestError.from_dict(item["dimple_error"])
                pipe.pending.append(first)
        return pipes

    async def streaming_completion(self, request: DimpleChatRequest, pipes: list):
        """OpenAI's chunks: the first with the role, the text as it settles, one with the finish_reason, and,
        only with `stream_options.include_usage`, a last one with no choices and the usage."""
        pipe, completed, first = pipes[0], False, True
        stream_id = f"chatcmpl-{request.dimple_request_id}"  # one id for all chunks, as OpenAI's
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        try:
            while True:
                got = await pipe.next()
                if got is None:
                    break
                item = _item(*got, self.queue_timeout)
                if "dimple_error" in item:
                    error = item["dimple_error"]
                    yield "data: " + json.dumps(error_body(error["message"], error.get("status", 500),
                                                           error.get("param"), error.get("code"),
                                                           error.get("kind"))) + "\n\n"
                    completed = True
                    return
                content = item.get("content") or ""
                if content or first:
                    delta = ChoiceDelta(role="assistant", content=content) if first else ChoiceDelta(content=content)
                    chunk = DimpleChatCompletionChunk(
                        id=stream_id, model=self.model_id, usage=None,
                        choices=[ChatCompletionStreamingChoice(index=0, delta=delta, finish_reason=None)])
                    yield f"data: {chunk.model_dump_json(by_alias=True)}\n\n"
                    first = False
                if "dimple" in item:
                    finish = DimpleChatCompletionChunk(
                        id=stream_id, model=self.model_id, usage=None,
                        choices=[ChatCompletionStreamingChoice(index=0, delta=ChoiceDelta(),
                                                               finish_reason=item["dimple"]["finish_reason"])])
                    yield f"data: {finish.model_dump_json(by_alias=True)}\n\n"
                    if include_usage:
                        usage = DimpleUsage(prompt_tokens=item["prompt_tokens"],
                                            completion_tokens=item["completion_tokens"],
                                            total_tokens=item["total_tokens"],
                                            forward_passes=item["dimple"]["forward_passes"])
                        last = DimpleChatCompletionChunk(id=stream_id, model=self.model_id, usage=usage, choices=[])
                        yield f"data: {last.model_dump_json(by_alias=True)}\n\n"
                    yield "data: [DONE]\n\n"
                    completed = True
                    return
            yield "data: " + json.dumps(error_body("the worker ended the stream without an answer", 500)) + "\n\n"
            completed = True
        finally:  # the client went away (Starlette cancels this generator) or the stream ended
            pipe.close()
            if not completed:
                self._cancel(request.dimple_request_id)

    async def non_streaming_completion(self, request: DimpleChatRequest, pipes: list):
        pipe, parts, final = pipes[0], [], None
        http_request, _ = _HTTP_REQUEST.get()
        try:
            while final is None:
                got = await pipe.next(http_request)
                if got is None:
                    break
                item = _item(*got, self.queue_timeout)
                if "dimple_error" in item:
                    raise RequestError.from_dict(item["dimple_error"])
                parts.append(item.get("content") or "")
                if "dimple" in item:
                    final = item
        except _ClientGone:
            self._cancel(request.dimple_request_id)
            raise RequestError("client disconnected", None, "client_disconnected", 499)
        finally:
            pipe.close()
        if final is None:
            raise RequestError("the worker ended the request without an answer", None, "internal_error", 500)
        response = DimpleChatCompletionResponse(
            id=f"chatcmpl-{request.dimple_request_id}", model=self.model_id,
            choices=[ChatCompletionResponseChoice(
                index=0, message=ChatMessage(role="assistant", content="".join(parts)),
                finish_reason=final["dimple"]["finish_reason"])],
            usage=DimpleUsage(prompt_tokens=final["prompt_tokens"], completion_tokens=final["completion_tokens"],
                              total_tokens=final["total_tokens"],
                              forward_passes=final["dimple"]["forward_passes"]),
        )
        return JSONResponse(response.model_dump(mode="json"))
