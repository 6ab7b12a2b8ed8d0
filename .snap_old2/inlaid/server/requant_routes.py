"""HTTP and Prometheus surfaces of dynamic task addition (re-quantization status).

Owns ``GET /v1/adapters/{name}`` (the adapter's registration and
re-quantization status JSON) and ``RequantCollector``, a Prometheus collector
that reads ``AsyncLLM.requant_statuses()`` at scrape time (no state of its
own, so nothing can drift from the requantizer's view):

- ``inlaid_requant_jobs{state}``: jobs by state (pending, running, done, failed)
- ``inlaid_requant_layers_done{adapter}`` / ``inlaid_requant_layers_total{adapter}``: layers re-quantized
- ``inlaid_requant_layers_swapped{adapter}``: layers installed into the served model
- ``inlaid_requant_phase_seconds{adapter,phase}``: time per phase (calibrate, quantize, swap_wait, persist, total)
- ``inlaid_requant_duty_cycle``: the worker's largest share of wall time in effect (``requant_duty_cycle``)
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import JSONResponse, Response

from inlaid.engine.async_llm import AsyncLLM
from inlaid.server.errors import from_exception

STATES = ("pending", "running", "done", "failed")


class RequantCollector(Collector):
    """Re-quantization gauges, computed from the requantizer's job statuses at each scrape."""

    def __init__(self, llm: AsyncLLM) -> None:
        self.llm = llm

    def collect(self) -> Iterator[GaugeMetricFamily]:
        statuses = self.llm.requant_statuses()
        jobs = GaugeMetricFamily("inlaid_requant_jobs", "Re-quantization jobs by state", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], sum(1 for s in statuses if s["quantization"] == state))
        yield jobs
        done = GaugeMetricFamily("inlaid_requant_layers_done", "Layers re-quantized", labels=["adapter"])
        swapped = GaugeMetricFamily("inlaid_requant_layers_swapped", "Layers swapped into the served model",
                                    labels=["adapter"])  # fmt: skip
        total = GaugeMetricFamily("inlaid_requant_layers_total", "Layers to re-quantize", labels=["adapter"])
        secs = GaugeMetricFamily("inlaid_requant_phase_seconds", "Seconds per re-quantization phase",
                                 labels=["adapter", "phase"])  # fmt: skip
        for s in statuses:
            done.add_metric([s["name"]], s["layer"])
            swapped.add_metric([s["name"]], s["layers_swapped"])
            total.add_metric([s["name"]], s["num_layers"])
            for phase, value in s["seconds"].items():
                secs.add_metric([s["name"], phase], value)
        yield from (done, swapped, total, secs)
        duty = self.llm.requant_settings().get("duty_cycle")
        if duty is not None:
            yield GaugeMetricFamily("inlaid_requant_duty_cycle", "Re-quantization worker's largest share of wall "
                                    "time (requant_duty_cycle)", value=float(duty))  # fmt: skip


def add_requant_routes(app: FastAPI, llm: AsyncLLM) -> None:
    """``GET /v1/adapters/{name}``: 200 with the status JSON, 404 for an adapter never added."""

    @app.get("/v1/adapters/{name}")
    async def adapter_status(name: str) -> Response:
        try:
            return JSONResponse(await llm.adapter_status(name))
        except Exception as exc:
            raise from_exception(exc) from exc
