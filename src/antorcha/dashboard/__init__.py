"""The operator surface of a coordinator: Prometheus metrics (`metrics`), the JSON API (`api`) and
the one-page dashboard served with them over HTTP (`http`, `static/`)."""
