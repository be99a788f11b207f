"""The bare baseline for measure 7: one Flask JSON route, no database, no auth, no schema — served by the same
gunicorn settings as the platform. It answers with the very JSON body the platform returned for the job
(read once at start from BENCH_JOB_JSON), so both sides serialise the same payload size.

    gunicorn --workers 2 --threads 4 'bare_flask_app:create_app()'
"""

from __future__ import annotations

import json
import os

from flask import Flask, jsonify


def create_app() -> Flask:
    app = Flask(__name__)
    path = os.environ.get("BENCH_JOB_JSON")
    body = json.loads(open(path).read()) if path else {"id": 1, "status": "SUCCEEDED"}

    @app.get("/api/v1/jobs/<int:job_id>")
    def get_job(job_id: int):
        return jsonify({**body, "id": job_id})

    return app
