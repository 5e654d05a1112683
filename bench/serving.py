"""Serving benchmark (issue 4, item 7): what the gRPC services cost and what dynamic batching buys, measured side by
side in one run on the built-in generator and classifier.

    python bench/serving.py                 # about 4 minutes on 2 cores
    python bench/serving.py --threads 2     # torch intra-op threads of the servers and of the in-process runs

Writes `bench/results/serving.json` and prints a table. How each figure is made:

- grpc_over_inprocess: one client sends batches of b latents (class ids, float32 tensor output) to a generation
  service in its own process, one request after another; images per second through gRPC over images per second of
  the same model called in this process (ids looked up, inference mode, same torch thread count). The service runs
  with GANSTEER_MAX_DELAY_MS=0; `..._default_delay` repeats it at the default 5 ms delay, which a lone client should
  not pay (the batcher waits only for as many requests as its previous batch held). The classifier's figures
  (Score, `logits`) are in `..._classifier` and `detail`.
- batching_gain_32_clients: 32 concurrent clients (grpc.aio, one process) each asking for one image at a time, for a
  fixed time; throughput with batching on (GANSTEER_MAX_BATCH=64, default 5 ms delay) over batching off
  (GANSTEER_MAX_BATCH=1: one forward pass per request, still on the batcher thread), with p50/p99 latency of each.
- onnx_over_torch: forward throughput of the ONNX Runtime export over the torch module, in this process, same
  intra-op thread count, at batch 1 and 64.

Configurations are measured in interleaved rounds (A, B, A, B, ..., the order rotating from round to round) and the
median kept, so drift in machine load (other processes share these cores) hits every configuration alike. The load
average is recorded, and the spread of the rounds (min and max) is kept beside each median in `detail`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from gansteer.tensors import from_tensor_proto, to_tensor_proto
from gansteer_server.config import BUILTIN_REGISTRY
from gansteer_server.models import ModelRegistry, OnnxModel
from gansteer_server.proto import common_pb2, generation_pb2, generation_pb2_grpc, scoring_pb2, scoring_pb2_grpc

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 16, 64)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def service(kind: str, threads: int, **settings: str) -> Iterator[str]:
    """A `gansteer-<kind>` process on a free port with `GANSTEER_<KEY>=value` settings; yields its address."""
    port = free_port()
    env = {
        **os.environ,
        "GANSTEER_REGISTRY": tempfile.mkdtemp(prefix="gansteer-bench-"),
        f"GANSTEER_{kind.upper()}_PORT": str(port),
        f"GANSTEER_{kind.upper()}_METRICS_PORT": "0",
        "GANSTEER_TORCH_THREADS": str(threads),
        "GANSTEER_LOG_LEVEL": "WARNING",
        **{f"GANSTEER_{key.upper()}": value for key, value in settings.items()},
    }
    script = Path(sys.executable).parent / f"gansteer-{kind}"
    process = subprocess.Popen([str(script)], env=env)
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=60)


def rate(step: Callable[[], int], seconds: float) -> float:
    """Items per second of `step()` (which returns how many items it handled), after one warm-up call."""
    step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += step()
    return done / (time.perf_counter() - start)


def generate_request(model: str, batch: int, latent_size: int) -> generation_pb2.GenerateRequest:
    seed = np.random.default_rng(batch)
    return generation_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name=model),
        latents=to_tensor_proto(seed.standard_normal((batch, latent_size)).astype(np.float32)),
        condition=common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=seed.integers(0, 10, batch).tolist())),
        format=common_pb2.IMAGE_FORMAT_TENSOR,
    )


def grpc_generation_rate(address: str, model: str, batch: int, latent_size: int, seconds: float) -> float:
    request = generate_request(model, batch, latent_size)
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        return rate(lambda: from_tensor_proto(stub.Generate(request).images.tensor).shape[0], seconds)


def grpc_score_rate(address: str, model: str, images: torch.Tensor, seconds: float) -> float:
    request = scoring_pb2.ScoreRequest(
        images=common_pb2.ImageBatch(tensor=to_tensor_proto(images.numpy())),
        model=common_pb2.ModelRef(name=model),
        outputs=[scoring_pb2.OutputRequest(output="logits")],
    )
    with grpc.insecure_channel(address) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        return rate(lambda: from_tensor_proto(stub.Score(request).outputs[0].values).shape[0], seconds)


def local_rate(forward: Callable[[], torch.Tensor], seconds: float) -> float:
    with torch.inference_mode():
        return rate(lambda: forward().shape[0], seconds)


async def concurrent_clients(
    address: str, model: str, latent_size: int, clients: int, seconds: float
) -> dict[str, float]:
    request = generate_request(model, 1, latent_size)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        await asyncio.gather(*(stub.Generate(request) for _ in range(clients)))  # warm-up
        stop = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop:
                sent = time.perf_counter()
                await stub.Generate(request)
                latencies.append(time.perf_counter() - sent)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "requests": len(latencies),
    }


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def spread_of(rounds: list[dict[str, float]]) -> dict[str, list[float]]:
    return {key: [min(r[key] for r in rounds), max(r[key] for r in rounds)] for key in rounds[0]}


def machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "accelerator": "none (CPU only)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "torch_threads_servers": threads,
        "torch_threads_in_process": torch.get_num_threads(),
        "onnxruntime_intra_op_threads": threads,
        "load_average_start": os.getloadavg(),
    }


@dataclass
class Models:
    """The benchmarked models in this process: torch modules and their ONNX Runtime exports."""

    generator_name: str
    classifier_name: str
    generator: nn.Module
    classifier: nn.Module
    generator_onnx: OnnxModel
    classifier_onnx: OnnxModel

    @classmethod
    def load(cls, registry: ModelRegistry, generator: str, classifier: str, threads: int) -> Models:
        onnx = {
            name: OnnxModel(registry.resolve(name).folder / str(registry.card(name).onnx), threads=threads)
            for name in (generator, classifier)
        }
        torch_modules = {name: registry.load(name) for name in (generator, classifier)}
        assert all(isinstance(m, nn.Module) for m in torch_modules.values())
        return cls(
            generator,
            classifier,
            torch_modules[generator],
            torch_modules[classifier],
            onnx[generator],
            onnx[classifier],
        )  # type: ignore[arg-type]

    @property
    def latent(self) -> int:
        return int(self.generator.z_size)

    def rates(
        self, batch: int, generation: dict[str, str], scoring: str, seconds: float, rotate: int = 0
    ) -> dict[str, float]:
        """Images per second at `batch`: in process (torch, ONNX) and through each service. The order of the
        measurements rotates with `rotate`, so none always runs right after the same neighbour."""
        z = torch.randn(batch, self.latent)
        ids = torch.randint(0, 10, (batch,))
        embedding = self.generator.embedding.weight[ids].detach()
        images = torch.rand(batch, 3, 32, 32) * 2 - 1
        name, latent = self.generator_name, self.latent
        measurements: list[tuple[str, Callable[[], float]]] = [
            ("gen_local", lambda: local_rate(lambda: self.generator(z, ids), seconds)),
            ("gen_grpc", lambda: grpc_generation_rate(generation["no_delay"], name, batch, latent, seconds)),
            (
                "gen_grpc_default_delay",
                lambda: grpc_generation_rate(generation["default_delay"], name, batch, latent, seconds),
            ),
            ("gen_onnx", lambda: local_rate(lambda: self.generator_onnx(z, embedding), seconds)),
            ("clf_local", lambda: local_rate(lambda: self.classifier(images), seconds)),
            ("clf_grpc", lambda: grpc_score_rate(scoring, self.classifier_name, images, seconds)),
            ("clf_onnx", lambda: local_rate(lambda: self.classifier_onnx(images), seconds)),
        ]
        shift = rotate % len(measurements)
        return {key: measure() for key, measure in measurements[shift:] + measurements[:shift]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch (and ONNX Runtime) intra-op threads")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one throughput measurement")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved repetitions of each measurement")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--generator", default="scenes-gen")
    parser.add_argument("--classifier", default="scenes-clf")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registry = ModelRegistry([BUILTIN_REGISTRY])
    models = Models.load(registry, args.generator, args.classifier, args.threads)
    gc.freeze()  # as the services do: no full collection over torch's objects in the middle of a measurement
    info = machine(args.threads)
    gen_cfg = {"no_delay": {"max_delay_ms": "0"}, "default_delay": {}, "batching_off": {"max_batch": "1"}}

    with ExitStack() as stack:
        gen = {name: stack.enter_context(service("generation", args.threads, **cfg)) for name, cfg in gen_cfg.items()}
        scoring = stack.enter_context(service("scoring", args.threads, max_delay_ms="0"))
        throughput: dict[str, list[dict[str, float]]] = {}
        clients: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
        for round_index in range(args.rounds + 1):  # round 0 warms every path up (models load) and is dropped
            print(f"round {round_index}/{args.rounds}" + (" (warm-up)" if round_index == 0 else ""), flush=True)
            seconds = args.seconds if round_index else args.seconds / 4
            for batch in BATCHES:
                measured_rates = models.rates(batch, gen, scoring, seconds, rotate=round_index)
                if round_index:
                    throughput.setdefault(str(batch), []).append(measured_rates)
            modes = [("on", gen["default_delay"]), ("off", gen["batching_off"])]
            for mode, address in modes if round_index % 2 else modes[::-1]:
                outcome = asyncio.run(
                    concurrent_clients(address, args.generator, models.latent, args.clients, 2 * seconds)
                )
                if round_index:
                    clients[mode].append(outcome)

    by_batch = {batch: median_of(rounds) for batch, rounds in throughput.items()}
    on, off = median_of(clients["on"]), median_of(clients["off"])
    info["load_average_end"] = os.getloadavg()
    result = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "models": {"generator": args.generator, "classifier": args.classifier},
        "grpc_over_inprocess": {b: r["gen_grpc"] / r["gen_local"] for b, r in by_batch.items()},
        "grpc_over_inprocess_default_delay": {
            b: r["gen_grpc_default_delay"] / r["gen_local"] for b, r in by_batch.items()
        },
        "grpc_over_inprocess_classifier": {b: r["clf_grpc"] / r["clf_local"] for b, r in by_batch.items()},
        "batching_gain_32_clients": on["images_per_s"] / off["images_per_s"],
        "p50_ms_batching_on": on["p50_ms"],
        "p50_ms_batching_off": off["p50_ms"],
        "p99_ms_batching_on": on["p99_ms"],
        "p99_ms_batching_off": off["p99_ms"],
        "onnx_over_torch": {
            "generator": {b: by_batch[b]["gen_onnx"] / by_batch[b]["gen_local"] for b in ("1", "64")},
            "classifier": {b: by_batch[b]["clf_onnx"] / by_batch[b]["clf_local"] for b in ("1", "64")},
        },
        "detail": {
            "images_per_s_by_batch": by_batch,
            "images_per_s_spread_by_batch": {batch: spread_of(rounds) for batch, rounds in throughput.items()},
            "clients_spread": {mode: spread_of(rounds) for mode, rounds in clients.items()},
            "clients_batching_on": on,
            "clients_batching_off": off,
            "rounds": args.rounds,
            "seconds_per_measurement": args.seconds,
            "clients": args.clients,
        },
        "machine": info,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")


def print_table(result: dict[str, Any]) -> None:
    info = result["machine"]
    print(
        f"\n{info['cpu']}, {info['cores']} cores; torch threads {info['torch_threads_servers']} (servers) / "
        f"{info['torch_threads_in_process']} (in process); load average {info['load_average_start'][0]:.1f} -> "
        f"{info['load_average_end'][0]:.1f}"
    )
    rates = result["detail"]["images_per_s_by_batch"]
    print(f"\n{'batch':>5} {'in-process/s':>13} {'gRPC/s':>8} {'ratio':>6} {'5ms-delay':>9} {'clf ratio':>9}")
    for batch, r in rates.items():
        print(
            f"{batch:>5} {r['gen_local']:>13.0f} {r['gen_grpc']:>8.0f} {result['grpc_over_inprocess'][batch]:>6.2f} "
            f"{result['grpc_over_inprocess_default_delay'][batch]:>9.2f} "
            f"{result['grpc_over_inprocess_classifier'][batch]:>9.2f}"
        )
    on, off = result["detail"]["clients_batching_on"], result["detail"]["clients_batching_off"]
    print(f"\n{result['detail']['clients']} clients, one image each: {'images/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for name, r in (("batching on", on), ("batching off", off)):
        print(f"  {name:<34} {r['images_per_s']:>9.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f}")
    print(f"  gain {result['batching_gain_32_clients']:.2f}x")
    onnx = result["onnx_over_torch"]
    print(
        "\nONNX Runtime / torch forward: "
        + ", ".join(f"{model} batch {b}: {ratio:.2f}" for model, by in onnx.items() for b, ratio in by.items())
    )


if __name__ == "__main__":
    main()
