"""The REST API v1 (FastAPI): ``app`` (factory and error handling),
``deps`` (request dependencies), ``schemas`` (API models),
``routes.{dags,runs,agents,health}`` (one router per noun)."""
