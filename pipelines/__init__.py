"""kiln's stage drivers and the pure code they share."""

# Load order: pipelines.config imports pipelines.ppo_config (and serving.config) at its end, and
# those import Section from pipelines.config, so pipelines.config must start first whichever
# module a caller imports first.
import pipelines.config  # noqa: F401
