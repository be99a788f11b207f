"""Trainyard: a job-queue training-and-serving platform for image models."""

__version__ = "0.1.0"
