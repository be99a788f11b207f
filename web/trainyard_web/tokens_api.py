"""REST API v1 for API tokens: who am I, list, create (admin), revoke."""

from __future__ import annotations

from apiflask import APIBlueprint

from trainyard import auth
from trainyard.auth import Role
from trainyard_web.runtime import platform
from trainyard_web.schemas import MeOut, TokenCreatedOut, TokenIn, TokenListOut, TokenOut
from trainyard_web.security import current_principal, requires

tokens_api = APIBlueprint("tokens", __name__, url_prefix="/api/v1", tag="Tokens")


def _out(view: auth.TokenView) -> TokenOut:
    return TokenOut.model_validate(view).model_copy(update={"active": view.active})


@tokens_api.get("/me")
@tokens_api.output(MeOut)
@tokens_api.doc(summary="The caller's user, role and token")
@requires(Role.VIEWER)
def me():
    principal = current_principal()
    token = next(t for t in auth.list_tokens(platform().db, user=principal.user) if t.id == principal.token_id)
    return MeOut(user=principal.user, role=principal.role, token=_out(token))


@tokens_api.get("/tokens")
@tokens_api.output(TokenListOut)
@tokens_api.doc(summary="Tokens, newest first: every token for an admin, one's own otherwise")
@requires(Role.VIEWER)
def list_tokens():
    principal = current_principal()
    user = None if principal.role is Role.ADMIN else principal.user
    return TokenListOut(items=[_out(t) for t in auth.list_tokens(platform().db, user=user)])


@tokens_api.post("/tokens")
@tokens_api.input(TokenIn, location="json", arg_name="body")
@tokens_api.output(TokenCreatedOut, status_code=201)
@tokens_api.doc(summary="Create a token (admin); its secret is in this response only", responses=[201, 422])
@requires(Role.ADMIN)
def create_token(body: TokenIn):
    token, secret = auth.create_token(platform().db, user=body.user, role=body.role, name=body.name,
                                      expires_in_days=body.expires_in_days, created_by=current_principal().user)
    return TokenCreatedOut(token=_out(token), secret=secret), 201


@tokens_api.delete("/tokens/<int:token_id>")
@tokens_api.output(TokenOut)
@tokens_api.doc(summary="Revoke a token at once (one's own, or any for an admin)", responses=[200, 404, 409])
@requires(Role.VIEWER)
def revoke_token(token_id: int):
    return _out(auth.revoke_token(platform().db, token_id, current_principal()))
