"""The old import path of the Ray Serve app (``serving.app:app_builder`` / ``:build_app`` in Serve YAML files).

The app lives in ``serving.api_router``; this alias keeps existing Serve YAML files and charts working."""

from serving.api_router import LLMServer, app_builder, build_app  # noqa: F401
