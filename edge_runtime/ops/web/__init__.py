"""The status page for the people who run the box: what arrived, what came back, how long it took, what it
looks like. Server-rendered HTML on the service's HTTP port, beside ``/healthz``, ``/readyz`` and ``/metrics``.

- :mod:`.server`: the HTTP server (routes, GET only, security headers);
- :mod:`.access`: the optional access token;
- :mod:`.index`: read-only queries of the spool index;
- :mod:`.quality`: agreement, latency, confidence and drift from what the service keeps;
- :mod:`.render`: the HTML;
- :mod:`.page`: the routes that put them together.
"""
