"""Celery configuration for Flower (`celery --workdir=/app/deploy --config=flower_celeryconfig flower`).

Flower must use the platform's broker settings, not Celery's defaults: with kombu's Redis transport the
priority lists (`<queue>:<n>`) and the remote-control bindings are named with the platform's `sep`, so a
Flower on the defaults would count queue lengths wrong and never receive the workers' replies. Read once,
when Flower starts (an entry point, like the CLI).
"""

from trainyard.config import Settings
from trainyard.queueing import celery_config

globals().update(celery_config(Settings()))
