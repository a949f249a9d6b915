"""The listener and its lifecycle: accept, reload, drain, workers, the admin port."""
