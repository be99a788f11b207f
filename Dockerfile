FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY platform platform
COPY workers workers
COPY web web
COPY migrations migrations
RUN pip install --no-cache-dir -e .
ENV PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["trainyard", "worker"]
