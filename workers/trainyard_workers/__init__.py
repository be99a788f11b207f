"""Trainyard's Celery workers: thin tasks over the training engine, and the GPU worker-pool launcher."""

__all__ = ["create_celery_app"]


def __getattr__(name: str):
    # Imported on first use: the app pulls in torch and MLflow (seconds), which `drain` and `pool` never need.
    if name == "create_celery_app":
        from trainyard_workers.app import create_celery_app

        return create_celery_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
