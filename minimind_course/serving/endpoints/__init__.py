"""One module per endpoint, each a FastAPI ``router`` that ``create_app`` includes."""
