"""The gRPC services: generation and scoring servicers, their interceptors, dynamic batching and the entry points.

Start one in-process with `gansteer_server.servers.app.start_generation_server(settings)` (or
`start_scoring_server`), or as a process with the console scripts `gansteer-generation` and `gansteer-scoring`.
"""
