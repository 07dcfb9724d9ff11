"""Integrations of the op with other libraries; each is imported on its own, on demand."""
