"""Integrations of the op with other libraries; each is imported on its own, on demand."""

# The oldest transformers release the transformers integration is tested with (the mask
# interface's q_offset, kv_offset and local_size arguments and the cache layers' mask sizes
# are those of this release onwards). Here, so that it can be read without transformers.
TRANSFORMERS_MINIMUM_VERSION = "5.24"
