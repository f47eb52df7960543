"""The BentoML service, one file per job along the request path.

``api`` (HTTP endpoints, ``CSCService``) -> ``engine`` (decoded requests to backend calls, tiling) ->
``batcher`` (adaptive batches across requests) -> ``batch_call`` (one batch's backend call and what it reports)
-> ``csc_serve.backends``. Beside the path: ``payloads`` and ``codes`` (request and answer bodies), ``guard``
(auth, limits, timeouts), ``settings`` (every limit, and the memory they bound), ``metadata``, ``metrics``
(Prometheus figures and each request's Server-Timing), and ``process`` (a ``bentoml serve`` child process for
benchmarks and tests).

Nothing is imported here, so the payload and engine modules load without BentoML;
``bentoml serve csc_serve.service.api:CSCService`` starts the service.
"""
