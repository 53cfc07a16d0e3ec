"""The run report: a static HTML page and a Markdown summary built from a run directory."""
