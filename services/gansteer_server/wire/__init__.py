"""The transport-neutral layer that servers and jobs share: errors, request validation, conversion to messages."""
