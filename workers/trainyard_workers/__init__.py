"""Trainyard's Celery workers: thin tasks over the training engine, and the GPU worker-pool launcher."""

from trainyard_workers.app import create_celery_app

__all__ = ["create_celery_app"]
