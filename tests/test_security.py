"""Who may call what: tokens, roles, the UI login, CSRF, body and rate limits, against the real web app."""

from __future__ import annotations

import stat
import threading
import time
from datetime import timedelta

import pytest
from limits import parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter
from sqlalchemy import func, select, update

from trainyard import auth
from trainyard.db import Database
from trainyard.models import ApiToken, Job, utcnow
from trainyard_web import create_app, security

from conftest import authed_client, make_token, ui_login

GOOD = {"kind": "train", "dataset": "digits", "architecture": "cnn", "params": {"epochs": 1}}
PUBLIC = {("GET", "/api/v1/health")}


def api_routes(app) -> list[tuple[str, str]]:
    """Every (method, concrete path) the app serves under /api/v1, path parameters filled in."""
    filled = {"job_id": "1", "token_id": "1", "name": "digits", "version": "1", "alias": "staging", "sweep_id": "1"}
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        path = rule.rule
        for arg in rule.arguments:
            path = path.replace(f"<int:{arg}>", filled[arg]).replace(f"<{arg}>", filled[arg])
        routes += [(method, path) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return routes


def count_jobs(settings) -> int:
    db = Database(settings.database_url)
    try:
        with db.session_scope() as s:
            return s.scalar(select(func.count(Job.id)))
    finally:
        db.dispose()


def test_every_api_route_but_health_needs_a_token(web_app, anonymous_client, web_settings):
    routes = api_routes(web_app)
    assert len(routes) >= 18 and ("GET", "/api/v1/openapi.json") in routes
    for method, path in routes:
        response = anonymous_client.open(path, method=method, json={})
        if (method, path) in PUBLIC:
            assert response.status_code in (200, 503), path
            continue
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.get_json()["status"] == 401
        bad = anonymous_client.open(path, method=method, json={}, headers={"Authorization": "Bearer ty_forged"})
        assert bad.status_code == 401, (method, path)
        basic = anonymous_client.open(path, method=method, headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
        assert basic.status_code == 401, (method, path)
    assert count_jobs(web_settings) == 0


def test_viewers_read_and_are_refused_every_change(web_app, web_settings):
    make_token(web_settings)  # token 1 is an admin's, not the viewer's
    viewer = authed_client(web_app, role="viewer", user="vera")
    changes = [(m, p) for m, p in api_routes(web_app) if m != "GET"]
    assert len(changes) >= 9
    for method, path in changes:
        response = viewer.open(path, method=method, json=GOOD)
        if path == "/api/v1/tokens/1":  # revoking: a viewer may revoke their own; token 1 is not theirs
            assert response.status_code == 404
            continue
        assert response.status_code == 403, (method, path, response.status_code)
        assert "role" in response.get_json()["detail"]
    assert viewer.get("/api/v1/jobs").status_code == 200
    assert viewer.get("/api/v1/openapi.json").status_code == 200
    assert viewer.get("/api/v1/me").get_json()["role"] == "viewer"
    assert count_jobs(web_settings) == 0


def test_members_own_their_jobs_and_admins_own_everything(web_app):
    ada = authed_client(web_app, role="member", user="ada")
    bob = authed_client(web_app, role="member", user="bob")
    admin = authed_client(web_app)
    mine = ada.post("/api/v1/jobs", json=GOOD).get_json()
    theirs = bob.post("/api/v1/jobs", json=GOOD).get_json()
    assert (mine["owner"], theirs["owner"]) == ("ada", "bob")
    refused = ada.post(f"/api/v1/jobs/{theirs['id']}/cancel")
    assert refused.status_code == 403 and "bob's" in refused.get_json()["detail"]
    assert ada.get(f"/api/v1/jobs/{theirs['id']}").get_json()["status"] == "QUEUED"  # unchanged
    assert ada.post(f"/api/v1/jobs/{mine['id']}/cancel").get_json()["status"] == "CANCELLED"
    assert admin.post(f"/api/v1/jobs/{theirs['id']}/cancel").get_json()["status"] == "CANCELLED"
    assert ada.post(f"/api/v1/jobs/{theirs['id']}/retry").status_code == 403
    assert ada.post(f"/api/v1/jobs/{mine['id']}/retry").get_json()["status"] == "QUEUED"
    events = ada.get(f"/api/v1/jobs/{mine['id']}").get_json()["events"]
    assert events[0]["message"] == "submitted by ada"
    # members may not mint tokens, nor move production
    assert ada.post("/api/v1/tokens", json={"user": "eve", "role": "admin"}).status_code == 403
    assert ada.put("/api/v1/models/x/aliases/production", json={"version": 1}).status_code == 403


def test_tokens_are_hashed_shown_once_revocable_and_expire(web_app, web_settings, anonymous_client):
    admin = authed_client(web_app)
    created = admin.post("/api/v1/tokens", json={"user": "cara", "role": "member", "name": "laptop",
                                                 "expires_in_days": 7})
    assert created.status_code == 201
    secret, token = created.get_json()["secret"], created.get_json()["token"]
    assert secret.startswith("ty_") and len(secret) > 40 and token["prefix"] == secret[:10]
    listed = admin.get("/api/v1/tokens").get_json()["items"]
    assert secret not in str(listed) and any(t["id"] == token["id"] for t in listed)
    db = Database(web_settings.database_url)
    try:
        with db.session_scope() as s:
            stored = s.scalars(select(ApiToken.token_hash)).all()
        assert auth.hash_token(secret) in stored and secret not in stored

        cara = {"Authorization": f"Bearer {secret}"}
        assert anonymous_client.get("/api/v1/me", headers=cara).get_json()["user"] == "cara"
        # a member sees only their own tokens, and may revoke their own
        assert [t["user"] for t in anonymous_client.get("/api/v1/tokens", headers=cara).get_json()["items"]] == ["cara"]
        for bad in ({"user": "cara", "role": "root"}, {"user": "../x", "role": "viewer"},
                    {"user": "cara", "role": "viewer", "expires_in_days": 0}):
            assert admin.post("/api/v1/tokens", json=bad).status_code == 422, bad
        revoked = anonymous_client.delete(f"/api/v1/tokens/{token['id']}", headers=cara)
        assert revoked.status_code == 200 and revoked.get_json()["active"] is False
        after = anonymous_client.get("/api/v1/me", headers=cara)
        assert after.status_code == 401 and "revoked" in after.get_json()["detail"]

        expiring = make_token(web_settings, role="admin", user="old")
        with db.session_scope() as s:
            s.execute(update(ApiToken).where(ApiToken.token_hash == auth.hash_token(expiring))
                      .values(expires_at=utcnow() - timedelta(seconds=1)))
        expired = anonymous_client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {expiring}"})
        assert expired.status_code == 401 and "expired" in expired.get_json()["detail"]
    finally:
        db.dispose()


def test_bootstrap_admin_token_file(web_settings):
    db = Database(web_settings.database_url)
    path = web_settings.admin_token_path
    try:
        first = auth.bootstrap_admin_token(db, path)
        assert first and path.read_text().strip() == first
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert auth.bootstrap_admin_token(db, path) is None  # still valid: nothing new, nothing printed
        principal = auth.authenticate(db, first)
        auth.revoke_token(db, principal.token_id, principal)
        second = auth.bootstrap_admin_token(db, path)
        assert second and second != first and auth.authenticate(db, second).role is auth.Role.ADMIN
    finally:
        db.dispose()


def test_ui_login_csrf_session_and_logout(web_app, web_settings):
    client = web_app.test_client()
    assert client.get("/jobs/1").headers["Location"] == "/login?next=/jobs/1"
    page = client.get("/login").get_data(as_text=True)
    assert 'type="password"' in page and 'for="token"' in page and "csrf_token" in page
    # without the form's CSRF token a login is refused, even with a good token
    token = make_token(web_settings, role="viewer", user="vera")
    assert client.post("/login", data={"token": token}).status_code == 400
    wrong = ui_login(client, "ty_not-a-real-token")
    assert wrong.status_code == 401 and "Unknown token" in wrong.get_data(as_text=True)
    response = ui_login(client, token)
    assert response.status_code == 302
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie  # plain http here
    assert "vera (viewer)" in client.get("/").get_data(as_text=True)
    # the session holds the token's id, not the secret
    assert token not in cookie
    assert client.post("/logout").status_code == 400  # logout is a form too: CSRF applies
    page = client.get("/").get_data(as_text=True)
    assert "Log out" in page
    # revoking the token ends the session at the next request
    db = Database(web_settings.database_url)
    try:
        principal = auth.authenticate(db, token)
        auth.revoke_token(db, principal.token_id, principal)
    finally:
        db.dispose()
    assert client.get("/").status_code == 302


def test_session_cookie_is_secure_over_https_and_next_stays_on_site(web_app, web_settings):
    client = web_app.test_client()
    token = make_token(web_settings)
    page = client.get("/login", base_url="https://trainyard.example").get_data(as_text=True)
    import re

    csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    response = client.post("/login?next=https://evil.example/", data={"token": token, "csrf_token": csrf},
                           base_url="https://trainyard.example", headers={"Referer": "https://trainyard.example/login"})
    assert response.status_code == 302 and response.headers["Location"] == "/"
    assert "Secure" in response.headers["Set-Cookie"]


def test_login_and_predict_are_rate_limited(tmp_path, web_settings):
    settings = web_settings.model_copy(update={"login_rate_limit": "3/minute", "predict_rate_limit": "2/minute"})
    app = create_app(settings)
    client = app.test_client()
    statuses = [ui_login(client, "ty_guess").status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    member = authed_client(app, role="member", user="ada")
    codes = [member.post("/api/v1/models/none/predict", json={"images": []}).status_code for _ in range(3)]
    assert codes[:2] != [429, 429] and codes[2] == 429
    assert member.get("/api/v1/jobs").status_code == 200  # the limit is on prediction, not the whole API
    assert isinstance(next(iter(app.extensions["limiter"])).storage, security.SweptMemoryStorage)  # memory:// default


def test_in_process_rate_limits_start_no_thread_per_hit_and_still_expire(monkeypatch):
    storage = storage_from_string(security.rate_limit_storage_uri("memory://"))
    started: list[threading.Thread] = []
    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda thread: (started.append(thread), real_start(thread))[1])
    limiter, three_a_second = FixedWindowRateLimiter(storage), parse("3/second")
    assert [limiter.hit(three_a_second, "caller") for _ in range(4)] == [True, True, True, False]
    limiter.hit(parse("1/second"), "another caller")
    time.sleep(1.1)
    assert limiter.hit(three_a_second, "caller")  # a new window: the expired count was dropped when read
    assert not [key for key in storage.storage if "another caller" in key]  # and the stale one swept
    assert started == []  # limits' own MemoryStorage starts a timer thread on these hits


def test_oversized_json_body_is_refused_and_stores_nothing(web_client, web_settings):
    huge = {**GOOD, "name": "x" * (2 * 1024 * 1024)}
    response = web_client.post("/api/v1/jobs", json=huge)
    assert response.status_code == 413 and response.get_json()["status"] == 413
    assert count_jobs(web_settings) == 0


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data", "file:///etc/passwd", "//host/share"])
def test_no_url_is_ever_fetched_for_a_dataset_or_weights(web_client, url):
    assert web_client.post("/api/v1/datasets", json={"name": "remote", "format": "imagefolder",
                                                     "path": url}).status_code == 422
    spec = {**GOOD, "params": {"epochs": 1}, "weights_path": url}
    assert web_client.post("/api/v1/jobs", json=spec).status_code == 422
