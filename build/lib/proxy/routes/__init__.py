"""HTTP routes, one module per area; each exposes `handlers` for create_app()."""
