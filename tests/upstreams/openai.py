"""A fake OpenAI chat.completions server (also DeepSeek: `reasoning_content` deltas)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.upstreams.base import FakeUpstream, Plan, sse

_ERRORS: dict[str, tuple[str, str | None, str]] = {
    # error -> (type, code, message); {model} and {key} are filled in
    "auth": (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: {key}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    "not_found": (
        "invalid_request_error",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    "rate_limit": (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3, "
        "Requested 1. Please try again in 1s.",
    ),
    "quota": (
        "insufficient_quota",
        "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "server": ("server_error", None, "The server had an error while processing your request."),
    "overloaded": ("server_error", None, "That model is currently overloaded with other requests."),
    "context": (
        "invalid_request_error",
        "context_length_exceeded",
        "This model's maximum context length is 128000 tokens. However, your messages "
        "resulted in 130000 tokens. Please reduce the length of the messages.",
    ),
    "echo": (
        "invalid_request_error",
        None,
        "Invalid 'messages[0]': sent with Authorization: Bearer {key} (api_key={key})",
    ),
    "filtered": (
        "invalid_request_error",
        "content_filter",
        "The response was filtered due to the prompt triggering content management policy.",
    ),
}


class OpenAIFake(FakeUpstream):
    """Speaks POST /v1/chat/completions (and /chat/completions, DeepSeek's path)."""

    def add_routes(self, app: web.Application) -> None:
        """Both paths the SDK may post to, depending on the base URL."""
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/chat/completions", self.handle)

    def presented_key(self, request: web.Request) -> str:
        """The Bearer token."""
        return request.headers.get("Authorization", "").removeprefix("Bearer ")

    def model(self, request: web.Request, body: Any) -> str:
        """The body's model."""
        return str(body.get("model", "")) if isinstance(body, dict) else ""

    def error_response(self, plan: Plan, model: str, status: int) -> web.Response:
        """OpenAI's {"error": {message, type, param, code}} body."""
        etype, code, message = _ERRORS[plan.error or "server"]
        headers = {"retry-after": plan.retry_after} if plan.retry_after else {}
        # The real API echoes (part of) a wrong key; echo all of it to test scrubbing.
        text = message.format(model=model, key=self.last_key)
        body = {"error": {"message": text, "type": etype, "param": None, "code": code}}
        return web.json_response(body, status=status, headers=headers)

    @property
    def last_key(self) -> str:
        """The key of the newest request."""
        if not self.records:
            return ""
        return self.records[-1].headers.get("Authorization", "").removeprefix("Bearer ")

    def frames(self, plan: Plan, model: str, body: Any) -> list[tuple[str, bytes]]:
        """chat.completion.chunk frames, the usage chunk if asked for, then [DONE]."""

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }

        out: list[tuple[str, bytes]] = [("head", sse(chunk({"role": "assistant", "content": ""})))]
        for piece in plan.reasoning:
            out.append(("text", sse(chunk({"content": None, "reasoning_content": piece}))))
        for i, piece in enumerate(plan.text):
            if plan.stream_error_after is not None and i == plan.stream_error_after:
                err = {"message": "The server had an error while processing your request."}
                out.append(("error", sse({"error": {**err, "type": "server_error"}})))
                return out
            out.append(("text", sse(chunk({"content": piece}))))
        finish = "content_filter" if plan.finish == "filtered" else plan.finish
        out.append(("finish", sse(chunk({}, finish))))
        options = body.get("stream_options") if isinstance(body, dict) else None
        if isinstance(options, dict) and options.get("include_usage"):
            p, c = plan.usage
            usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
            out.append(("usage", sse({**chunk({}), "choices": [], "usage": usage})))
        out.append(("done", sse("[DONE]")))
        return out
