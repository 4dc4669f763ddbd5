"""The Ray Serve application: an OpenAI-compatible endpoint for a model directory."""

# Load order: pipelines.config imports serving.config at its end (to hang ServeConfig on
# KilnConfig) and serving.config imports Section from pipelines.config, so pipelines.config
# must start first whichever module a caller imports first.
import pipelines.config  # noqa: F401
