"""Manual injection and status over HTTP (function-level keys).

POST /api/retrain          body: RetrainRequested (message_id optional); header Idempotency-Key optional
  202 {"request_id", ...}  accepted (a repeat with the same key and body gets the same answer)
  400 {"error", "errors"}  invalid JSON or fields (per-field messages), unknown model
  409                      the Idempotency-Key was used with another body
  413                      body over 256 KB
  405                      any method but POST
POST /api/models/{model}/{promote|rollback|pause|resume}   body {version, reason, requested_by, cancel}; same
  answers, plus 409 {"error": "rejected"} when the ledger refuses it (no such version, nothing to roll back to)
GET /api/status/{model}    the status view (pending per class, runs in flight, champion, ...)
GET /api/dashboard         the read-only console (worker.app.dashboard): ?model=, ?run=, ?run=&images=
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid

import azure.functions as func

from functions import auth, runtime

bp = func.Blueprint()
log = logging.getLogger("retrain.functions.http")
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(body, sort_keys=True), status_code=status, mimetype="application/json", headers=headers)


def _error(status: int, reason: str, description: str, errors: list | None = None) -> func.HttpResponse:
    return _json(status, {"error": reason, "description": description, "errors": errors or []})


@bp.function_name("retrain_http")
@bp.route(route="retrain", methods=ALL_METHODS, auth_level=func.AuthLevel.FUNCTION)
def retrain_http(req: func.HttpRequest) -> func.HttpResponse:
    from shared.messages import RetrainRequested

    return _accept(req, RetrainRequested, {"kind": "retrain.requested"})


@bp.function_name("control_http")
@bp.route(route="models/{model}/{action}", methods=ALL_METHODS, auth_level=func.AuthLevel.FUNCTION)
def control_http(req: func.HttpRequest) -> func.HttpResponse:
    """POST /api/models/{model}/{promote|rollback|pause|resume}, body {version, reason, requested_by, cancel}."""
    from shared.messages import ModelControl

    fixed = {"kind": "model.control", "model": req.route_params.get("model", ""), "action": req.route_params.get("action", "")}
    return _accept(req, ModelControl, fixed, empty_body_ok=True)


def _accept(req: func.HttpRequest, cls: type, fixed: dict, empty_body_ok: bool = False) -> func.HttpResponse:
    """An idempotent POST of one message: validate, apply through the worker, answer 202 (or replay)."""
    from shared.errors import InvalidMessage
    from shared.messages import load_document, parse_as

    if req.method.upper() != "POST":
        return func.HttpResponse(status_code=405, headers={"Allow": "POST"})
    try:
        who = auth.caller(req.headers, "control" if cls.__name__ == "ModelControl" else "request")
    except auth.Refused as exc:
        return _error(exc.status, exc.reason, exc.description)
    key = req.headers.get("Idempotency-Key")
    body = req.get_body() or b""
    try:
        document = load_document(body) if body or not empty_body_ok else {}
    except InvalidMessage as exc:
        return _error(413 if exc.reason == "too_large" else 400, exc.reason, exc.description)
    if key is not None and not (1 <= len(key) <= 200 and key.isprintable() and " " not in key):
        return _error(400, "schema", "Idempotency-Key must be 1-200 printable characters without spaces")
    document.update(fixed)
    # The actor is who the platform says called (or "function key"); what the body claims is a note.
    document["requested_by"] = auth.recorded_by(who.actor, document.get("requested_by"))
    # A key is scoped to its endpoint and model: the same key sent for another model (or as another
    # kind of request) is another request, carried out on its own; it used to share the first one's
    # message id and be dropped as its duplicate. The id holds none of the key's characters.
    scope = f"{cls.__name__}\n{document.get('model')}\n{key}"
    key_digest = hashlib.sha256(scope.encode()).hexdigest()[:40] if key else None
    document.setdefault("message_id", f"http-{key_digest}" if key else f"http-{uuid.uuid4().hex}")
    worker = runtime.worker()
    try:
        request = parse_as(cls, document, known_models=worker.config.models)
    except InvalidMessage as exc:
        return _error(400, exc.reason, exc.description, exc.errors)
    from worker.effects import Remember

    response = {"request_id": request.message_id, "model": request.model, "status": "accepted"}
    remember = None
    if key is not None:
        # Stored in the transaction that carries out the request: a request that failed left no key.
        fingerprint = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
        remember = Remember(f"http:{key_digest}", fingerprint, response)
    effects = worker.handle(request, remember=remember)
    if effects.replay is not None:
        if remember is None or effects.replay.fingerprint != remember.fingerprint:
            return _error(409, "idempotency_conflict", "this Idempotency-Key was already used with a different body")
        return _json(202, effects.replay.response, {"Idempotent-Replayed": "true"})
    log.info("http request %s for %s: %s %s", request.message_id, request.model, effects.outcome, effects.detail)
    if effects.outcome == "rejected":  # a control the ledger refused (e.g. promoting a version that does not exist)
        return _error(409, "rejected", effects.detail)
    return _json(202, {**response, "outcome": effects.outcome} if cls.__name__ == "ModelControl" else response)


@bp.function_name("status_http")
@bp.route(route="status/{model}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def status_http(req: func.HttpRequest) -> func.HttpResponse:
    from worker.views import status_view

    try:
        auth.caller(req.headers, "read")
    except auth.Refused as exc:
        return _error(exc.status, exc.reason, exc.description)
    model = req.route_params.get("model", "")
    worker = runtime.worker()
    if model not in worker.config.models:
        return _error(404, "unknown_model", f"model {model[:64]!r} is not configured")
    return _json(200, status_view(worker.store, worker.config, model)[model])


@bp.function_name("dashboard_http")
@bp.route(route="dashboard", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def dashboard_http(req: func.HttpRequest) -> func.HttpResponse:
    """The same read-only page `retrain dashboard` serves, for people signed in with Entra ID.

    A browser page must not carry a function key in its URL (it ends up in history and proxy logs),
    so this route takes no key and serves only a signed-in principal with a Retrain role; with
    function keys only (`RETRAIN_AUTH=function_key`) it is off: use `retrain dashboard` locally.
    """
    from worker.app.dashboard import CSP, respond

    try:
        who = auth.caller(req.headers, "read")
    except auth.Refused as exc:
        return _error(exc.status, exc.reason, exc.description)
    if not who.verified:
        return _error(403, "sign_in_required", "the dashboard is served to people signed in with Entra ID (RETRAIN_AUTH=entra); "
                      "locally, `retrain dashboard`")  # fmt: skip
    worker = runtime.worker()
    status, kind, body = respond(dict(req.params), worker.store, worker.config, worker.manifests)
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
    mimetype, _, charset = kind.partition("; charset=")
    return func.HttpResponse(body, status_code=status, mimetype=mimetype, charset=charset or "utf-8", headers=headers)
