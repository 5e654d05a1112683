"""`gansteer-web`: the rounds page, a small web front end where a person answers rounds in a browser: picks of an
interactive evolution, or graded comparisons of image pairs for human NES (the pairwise view).

    gansteer-web --port 8080                      # the services at GANSTEER_TARGET (default: the local stack)

It is the Python standard library's HTTP server over the SDK: the page (one HTML file with its script, no build step)
calls a small JSON API here, and this process talks to the services over gRPC with the caller's API key. It holds
no state of its own: the job, its open round and its interaction log live in the services, so a restarted front end
(or a reloaded page, which keeps the job id in its address) carries on where it was, and an answer sent twice (a
double-clicked "next round") carries one idempotency key per round and is recorded once.

The JSON API (the API key in the `X-Gansteer-Key` header, optional when the deployment has auth off):

    GET  /api/models                       generators with their classes
    POST /api/jobs                         {kind: evolution, model, class, mu, offspring, rounds, seed} or
                                           {kind: human_nes, model, class, images, pairs, raters, rounds, seed}
                                           -> {job_id}
    GET  /api/jobs/<id>/round              the job's state and, while it waits, its round with the images (and, for a
                                           pairwise round, its pairs as shown and its answer scale)
    POST /api/jobs/<id>/answer             {round_id, picks | action, step_size, key} (choice) or
                                           {round_id, scores, key} (pairwise: one score in [-1, 1] per pair, +1 left)
                                           -> the job's state
    GET  /api/jobs/<id>/result             the result's images once the job ended (and the new model versions)
    GET  /api/jobs/<id>/interactions       the interaction log (what was shown where, who answered what)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from PIL import Image as PILImage

from gansteer import errors
from gansteer._transport import DEFAULT_TARGET
from gansteer.client import Client
from gansteer.types import Answer, JobState

_STATUS = {
    errors.InvalidArgument: HTTPStatus.BAD_REQUEST,
    errors.NotFound: HTTPStatus.NOT_FOUND,
    errors.FailedPrecondition: HTTPStatus.CONFLICT,
    errors.Unauthenticated: HTTPStatus.UNAUTHORIZED,
    errors.PermissionDenied: HTTPStatus.FORBIDDEN,
    errors.Unavailable: HTTPStatus.SERVICE_UNAVAILABLE,
}
_JOB_PATH = re.compile(r"^/api/jobs/([A-Za-z0-9_-]{1,64})/(round|answer|result|interactions)$")


def data_url(image: PILImage.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Clients:
    """One SDK client per API key (the page sends its key with each call); closed with the server."""

    def __init__(self, target: str, generation_target: str | None, scoring_target: str | None) -> None:
        self.target, self.generation_target, self.scoring_target = target, generation_target, scoring_target
        self._clients: dict[str, Client] = {}
        self._lock = threading.Lock()

    def get(self, api_key: str) -> Client:
        with self._lock:
            if api_key not in self._clients:
                self._clients[api_key] = Client(
                    self.target,
                    api_key=api_key or None,
                    generation_target=self.generation_target,
                    scoring_target=self.scoring_target,
                    timeout=60,
                )
            return self._clients[api_key]

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


def _job_state(client: Client, job_id: str) -> dict[str, Any]:
    status = client.get_job(job_id)
    document: dict[str, Any] = {"job_id": job_id, "state": status.state.value, "error": status.error}
    pending = status.pending_round if status.state is JobState.WAITING_FOR_FEEDBACK else None
    if pending is not None:
        images = client._run(client._core.render(pending))  # the generation service renders the stored latents
        document["round"] = {
            "round_id": pending.round_id,
            "number": pending.round,
            "choose": pending.choose,
            "allow_repeats": pending.allow_repeats,
            "actions": list(pending.actions),
            "step_size": pending.step_size,
            "generator": pending.generator,
            "answer": pending.answer.value,
            "pairs": [list(pair) for pair in pending.pairs],
            "answer_levels": pending.answer_levels,
            "answers_required": pending.answers_required,
            "items": [
                {"item_id": item.item_id, "parent_ids": list(item.parent_ids), "seed": item.seed, "image": data_url(im)}
                for item, im in zip(pending.items, images, strict=True)
            ],
        }
    return document


class Handler(BaseHTTPRequestHandler):
    clients: Clients
    server_version = "gansteer-web"

    def log_message(self, format: str, *args: Any) -> None:
        if os.environ.get("GANSTEER_WEB_LOG"):
            super().log_message(format, *args)

    # --- plumbing -------------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, document: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(document).encode(), "application/json")

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1_000_000:
            raise errors.InvalidArgument("request body over 1 MB")
        document = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(document, dict):
            raise errors.InvalidArgument("expected a JSON object")
        return document

    def _client(self) -> Client:
        return self.clients.get(self.headers.get("X-Gansteer-Key", ""))

    def _guard(self, run: Callable[[], None]) -> None:
        try:
            run()
        except errors.GansteerError as error:
            status = next((code for cls, code in _STATUS.items() if isinstance(error, cls)), HTTPStatus.BAD_GATEWAY)
            field = getattr(error, "field", "")
            self._json({"error": str(error.message or error), "field": field, "kind": type(error).__name__}, status)
        except (ValueError, KeyError, TypeError) as error:
            self._json({"error": f"bad request: {error}", "field": "", "kind": "BadRequest"}, HTTPStatus.BAD_REQUEST)

    # --- routes ---------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            page = resources.files("gansteer.web").joinpath("index.html").read_bytes()
            self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            return
        if path == "/healthz":
            self._json({"ok": True})
            return
        if path == "/api/models":
            self._guard(self._models)
            return
        match = _JOB_PATH.match(path)
        if match and match.group(2) in ("round", "result", "interactions"):
            job_id, what = match.groups()
            self._guard(lambda: self._job_get(job_id, what))
            return
        self._json({"error": f"no such page {path}"}, HTTPStatus.NOT_FOUND)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/api/jobs":
            self._guard(self._submit)
            return
        match = _JOB_PATH.match(path)
        if match and match.group(2) == "answer":
            job_id = match.group(1)
            self._guard(lambda: self._answer(job_id))
            return
        self._json({"error": f"no such endpoint {path}"}, HTTPStatus.NOT_FOUND)

    def _models(self) -> None:
        models = self._client().models("generator")
        self._json([{"ref": m.ref, "name": m.name, "classes": list(m.class_names)} for m in models])

    def _submit(self) -> None:
        body = self._body()
        if body.get("kind") == "human_nes":
            self._submit_nes(body)
            return
        options: dict[str, Any] = {
            name: int(body[name]) for name in ("mu", "offspring", "rounds", "seed") if body.get(name) not in (None, "")
        }
        if body.get("class") not in (None, ""):
            value = str(body["class"])
            options["conditioned_class"] = int(value) if value.isdigit() else value
        job = self._client().evolve(model=str(body.get("model") or "scenes-gen"), **options)
        self._json({"job_id": job.id})

    def _submit_nes(self, body: dict[str, Any]) -> None:
        names = {"images": "images", "pairs": "pairs_per_image", "raters": "raters_per_pair", "rounds": "rounds"}
        options: dict[str, Any] = {
            option: int(body[name]) for name, option in names.items() if body.get(name) not in (None, "")
        }
        if body.get("seed") not in (None, ""):
            options["seed"] = int(body["seed"])
        if body.get("class") not in (None, ""):
            value = str(body["class"])
            options["conditioned_class"] = int(value) if value.isdigit() else value
        job = self._client().human_nes(model=str(body.get("model") or "scenes-gen"), **options)
        self._json({"job_id": job.id})

    def _job_get(self, job_id: str, what: str) -> None:
        client = self._client()
        if what == "round":
            self._json(_job_state(client, job_id))
        elif what == "result":
            result = client.get_result(job_id, kind=client.get_job(job_id).kind)
            images = [data_url(im) for im in result.images]
            self._json({"images": images, "metrics": result.metrics, "models": list(result.models)})
        else:
            log = client.interactions(job_id)
            self._json(
                [
                    {
                        "round": entry.round,
                        "round_id": entry.round_id,
                        "rater": entry.rater,
                        "action": entry.action,
                        "choice": list(entry.choice or ()),
                        "step_size": entry.step_size,
                        "shown": [item.item_id for item in entry.items],
                        "pairs": [list(pair) for pair in entry.pairs],
                        "pairwise": list(entry.pairwise or ()),
                        "idempotency_key": entry.idempotency_key,
                    }
                    for entry in log
                ]
            )

    def _answer(self, job_id: str) -> None:
        body = self._body()
        if body.get("scores") is not None:
            answer = Answer(pairwise=[float(score) for score in body["scores"]])
        else:
            action = str(body.get("action") or "pick")
            picks = [int(i) for i in body.get("picks") or []]
            step = body.get("step_size")
            answer = Answer(
                choice=picks if action == "pick" else None,
                action=action,  # type: ignore[arg-type]
                step_size=float(step) if step not in (None, "") else None,
            )
        client = self._client()
        result = client._run(
            client._core.submit_feedback(
                job_id,
                str(body["round_id"]),
                answer,
                rater=str(body.get("rater") or ""),
                idempotency_key=str(body.get("key") or "") or None,
                latency_s=float(body.get("latency_s") or 0.0),
            )
        )
        self._json({"job_id": job_id, "state": result.job.state.value, "duplicate": result.duplicate})


def serve(
    port: int = 8080,
    *,
    host: str = "127.0.0.1",
    target: str = DEFAULT_TARGET,
    generation_target: str | None = None,
    scoring_target: str | None = None,
) -> tuple[ThreadingHTTPServer, Clients]:
    """The server, bound (port 0: any free port) but not yet serving: call `serve_forever()`, then `shutdown()`."""
    clients = Clients(target, generation_target, scoring_target)
    handler = type("BoundHandler", (Handler,), {"clients": clients})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server, clients


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="gansteer-web", description="The rounds page: interactive evolution.")
    parser.add_argument("--host", default=env("GANSTEER_WEB_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("GANSTEER_WEB_PORT", "8080")))
    parser.add_argument("--target", default=env("GANSTEER_TARGET", DEFAULT_TARGET))
    parser.add_argument("--generation-target", default=env("GANSTEER_GENERATION_TARGET") or None)
    parser.add_argument("--scoring-target", default=env("GANSTEER_SCORING_TARGET") or None)
    args = parser.parse_args(argv)
    server, clients = serve(
        args.port,
        host=args.host,
        target=args.target,
        generation_target=args.generation_target,
        scoring_target=args.scoring_target,
    )
    print(f"gansteer-web on http://{args.host}:{server.server_address[1]}/ (services at {args.target})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        clients.close()


if __name__ == "__main__":
    main()
