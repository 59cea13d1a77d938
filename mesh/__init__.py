"""MaaS mesh shared core: settings, errors, logging, codec, registry, gRPC bootstrap."""
