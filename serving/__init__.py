"""The Ray Serve application: an OpenAI-compatible endpoint for a model directory."""
