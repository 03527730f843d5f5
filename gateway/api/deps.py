"""What every route needs: the services, the caller, and one error format.

Every 4xx/5xx body is ``{"error": {"code", "message", "field"?, "rule"?}}``; request
validation problems are **400** (not FastAPI's 422) naming the field and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.auth import AuthError, CredentialKind, Principal, authenticate
from gateway.config import GatewayConfig
from gateway.hub import Hub
from gateway.storage import ObjectStorage
from gateway.store import ConflictError, NotFoundError, Store
from gateway.tasks import TaskService
from gateway.validation import ValidationFailure

# pydantic error types → the rule names the API documents
_RULES = {
    "missing": "required",
    "extra_forbidden": "unknown_key",
    "enum": "options",
    "literal_error": "options",
    "greater_than_equal": "min",
    "greater_than": "min",
    "less_than_equal": "max",
    "less_than": "max",
    "string_too_long": "max_length",
    "string_too_short": "min_length",
    "too_long": "max_length",
    "string_pattern_mismatch": "pattern",
    "json_invalid": "json",
}


@dataclass(frozen=True)
class Services:
    """The gateway's parts, shared by all routes (``app.state.services``)."""

    config: GatewayConfig
    store: Store
    storage: ObjectStorage
    tasks: TaskService
    hub: Hub


class ApiError(Exception):
    """An error answer: status, machine code, message, and the field/rule when relevant."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        rule: str | None = None,
    ) -> None:
        """Describe the error."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.rule = rule


def error_response(
    status: int, code: str, message: str, field: str | None = None, rule: str | None = None
) -> JSONResponse:
    """The one error body format."""
    detail: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        detail["field"] = field
    if rule is not None:
        detail["rule"] = rule
    return JSONResponse({"error": detail}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception the routes raise to the documented error body."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)  # noqa: S101 - registered for ApiError only
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.rule)

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        rule = _RULES.get(str(first.get("type")), "type")
        return error_response(400, "validation_error", f"{field}: {first.get('msg')}", field, rule)

    async def failure(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ValidationFailure)  # noqa: S101
        return error_response(400, "validation_error", exc.message, exc.field, exc.rule)

    async def auth(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AuthError)  # noqa: S101
        return error_response(
            exc.status, "unauthorized" if exc.status == 401 else "forbidden", exc.message, exc.field
        )

    async def not_found(_: Request, __: Exception) -> JSONResponse:
        return error_response(404, "not_found", "no such resource")

    async def conflict(_: Request, exc: Exception) -> JSONResponse:
        return error_response(409, "conflict", str(exc))

    async def http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101
        return error_response(exc.status_code, "http_error", str(exc.detail))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(ValidationFailure, failure)
    app.add_exception_handler(AuthError, auth)
    app.add_exception_handler(NotFoundError, not_found)
    app.add_exception_handler(ConflictError, conflict)
    app.add_exception_handler(StarletteHTTPException, http)


def services(request: Request) -> Services:
    """The app's services."""
    found: Services = request.app.state.services
    return found


ServicesDep = Annotated[Services, Depends(services)]


def caller(
    request: Request,
    svc: ServicesDep,
    authorization: Annotated[str | None, Header()] = None,
    x_team_id: Annotated[str | None, Header()] = None,
) -> Principal:
    """Authenticate a REST caller (``sk-``, ``dk-`` or JWT + ``X-Team-ID``)."""
    del request
    return authenticate(
        authorization,
        x_team_id,
        surface="rest",
        lookup=svc.store.credential_by_hash,
        jwt_key=svc.config.jwt_key,
    )


CallerDep = Annotated[Principal, Depends(caller)]


def manager(principal: CallerDep) -> Principal:
    """Management routes (workflows) take ``dk-`` credentials and user tokens, not ``sk-``."""
    if principal.kind == CredentialKind.INTEGRATION:
        raise ApiError(403, "forbidden", "integration keys (sk-) may only use the /r/ API")
    return principal


ManagerDep = Annotated[Principal, Depends(manager)]
