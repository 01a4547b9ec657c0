"""A fake Gemini API: POST /{version}/models/{model}:streamGenerateContent?alt=sse."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.upstreams.base import FakeUpstream, Plan, sse

_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"


class GeminiFake(FakeUpstream):
    """Speaks the Gemini API's streamGenerateContent as server-sent events."""

    def add_routes(self, app: web.Application) -> None:
        """`/{version}/models/{model}:streamGenerateContent` for any API version."""
        app.router.add_post("/{version}/models/{target}", self.handle)

    def presented_key(self, request: web.Request) -> str:
        """The x-goog-api-key header, or the legacy ?key= parameter."""
        return request.headers.get("x-goog-api-key") or request.query.get("key", "")

    def model(self, request: web.Request, body: Any) -> str:
        """The model from the path."""
        return request.match_info.get("target", "").split(":")[0]

    def error_response(self, plan: Plan, model: str, status: int) -> web.Response:
        """Google's {"error": {code, message, status, details}} body."""
        key = self.records[-1].headers.get("x-goog-api-key", "") if self.records else ""
        details: list[dict[str, Any]] = []
        kind = plan.error or "server"
        if kind == "auth":
            # echo the key and a key-in-URL to prove that we scrub both
            status, rpc = 400, "INVALID_ARGUMENT"
            message = f"API key not valid. Please pass a valid API key. (key={key})"
            details.append({"@type": _ERROR_INFO, "reason": "API_KEY_INVALID"})
        elif kind == "unauthenticated":
            rpc = "UNAUTHENTICATED"
            message = "Request had invalid authentication credentials."
        elif kind == "not_found":
            rpc = "NOT_FOUND"
            message = (
                f"models/{model} is not found for API version v1beta, "
                "or is not supported for generateContent."
            )
        elif kind == "rate_limit":
            rpc = "RESOURCE_EXHAUSTED"
            message = "Resource has been exhausted (e.g. check quota)."
            if plan.retry_after:
                details.append({"@type": _RETRY_INFO, "retryDelay": f"{plan.retry_after}s"})
        elif kind == "quota":
            rpc = "RESOURCE_EXHAUSTED"
            message = "You exceeded your current quota, please check your plan and billing details."
            details.append(
                {
                    "@type": _QUOTA_FAILURE,
                    "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel"}],
                }
            )
        elif kind == "overloaded":
            rpc = "UNAVAILABLE"
            message = "The model is overloaded. Please try again later."
        elif kind == "echo":
            rpc = "INVALID_ARGUMENT"
            message = f"Invalid JSON payload for /v1beta/models/{model}?key={key} (key {key})"
        elif kind == "context":
            rpc = "INVALID_ARGUMENT"
            message = (
                "The input token count (1200000) exceeds the maximum number of tokens "
                "allowed (1048576)."
            )
        else:
            rpc = "INTERNAL"
            message = "An internal error has occurred. Please retry or report it."
        body: dict[str, Any] = {"error": {"code": status, "message": message, "status": rpc}}
        if details:
            body["error"]["details"] = details
        return web.json_response(body, status=status)

    def frames(self, plan: Plan, model: str, body: Any) -> list[tuple[str, bytes]]:
        """GenerateContentResponse chunks; the last text chunk carries finishReason."""
        p, c = plan.usage

        def frame(obj: dict[str, Any]) -> bytes:
            return sse(obj, newline="\r\n")

        def response(parts: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
            cand: dict[str, Any] = {"index": 0}
            if parts:
                cand["content"] = {"parts": parts, "role": "model"}
            if finish:
                cand["finishReason"] = finish
            usage: dict[str, Any] = {"promptTokenCount": p, "totalTokenCount": p}
            if finish:
                usage.update(candidatesTokenCount=c, totalTokenCount=p + c)
            return {
                "candidates": [cand],
                "usageMetadata": usage,
                "modelVersion": model,
                "responseId": "fake-response",
            }

        if plan.prompt_blocked:
            blocked = {
                "promptFeedback": {
                    "blockReason": "SAFETY",
                    "safetyRatings": [
                        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}
                    ],
                },
                "usageMetadata": {"promptTokenCount": p, "totalTokenCount": p},
                "modelVersion": model,
            }
            return [("blocked", frame(blocked))]
        out: list[tuple[str, bytes]] = []
        for piece in plan.reasoning:
            out.append(("text", frame(response([{"text": piece, "thought": True}]))))
        last = len(plan.text) - 1
        for i, piece in enumerate(plan.text):
            if plan.stream_error_after is not None and i == plan.stream_error_after:
                err = {
                    "code": 500,
                    "message": "An internal error has occurred.",
                    "status": "INTERNAL",
                }
                out.append(("error", frame({"error": err})))
                return out
            finish = None
            if i == last:
                finish = {"length": "MAX_TOKENS", "filtered": "SAFETY"}.get(plan.finish, "STOP")
            out.append(("text", frame(response([{"text": piece}], finish))))
        return out
