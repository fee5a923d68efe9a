"""The bundled reference models: presets, loading, and the recipes that trained them."""
