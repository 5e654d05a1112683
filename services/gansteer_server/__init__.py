"""gansteer server side: model registry, algorithms, the three gRPC services and the Celery worker."""
