"""Prometheus instrumentation for calcsvc's breakers, clients and servers.

Every metric family is created on first use, once per registry: importing
this package registers nothing.
"""

from calcsvc.instrumentation._breaker import (
    FailingStorage,
    PrometheusListener,
    error_label,
)
from calcsvc.instrumentation._grpc import (
    AioClientMetricsInterceptor,
    AioServerMetricsInterceptor,
    CallRecorder,
    ClientCallMetrics,
    ClientMetricsInterceptor,
    ServerMetricsInterceptor,
    serving_gauge,
    split_method,
)
from calcsvc.instrumentation._http import MetricsServer, start_metrics_server
from calcsvc.instrumentation._registry import LATENCY_BUCKETS

__all__ = [
    "LATENCY_BUCKETS",
    "AioClientMetricsInterceptor",
    "AioServerMetricsInterceptor",
    "CallRecorder",
    "ClientCallMetrics",
    "ClientMetricsInterceptor",
    "FailingStorage",
    "MetricsServer",
    "PrometheusListener",
    "ServerMetricsInterceptor",
    "error_label",
    "serving_gauge",
    "split_method",
    "start_metrics_server",
]
