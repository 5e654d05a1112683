"""The GenerationService servicer: validate, convert, run the generator through its batcher, convert back.

Every request for one generator goes through that generator's `DynamicBatcher` with one of two merge keys:
`forward` (images from latents and class embedding vectors, torch or ONNX Runtime) and `backward` (the
vector-Jacobian product, torch). Class ids are looked up to embedding vectors before queueing, so the batched
inputs are always (z, e) and requests with ids and with free embeddings share batches.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import torch
import torch.nn.functional as F
from torch import Tensor

from gansteer_server.models import ModelCard
from gansteer_server.models.conditional import ConditionalGenerator
from gansteer_server.models.store import ModelStore, model_to_wire
from gansteer_server.proto import common_pb2, generation_pb2, generation_pb2_grpc
from gansteer_server.servers import sampling
from gansteer_server.servers.batching import BatcherPool, DynamicBatcher, RunBatch
from gansteer_server.wire import convert, validation
from gansteer_server.wire.errors import ServiceError, invalid_argument
from gansteer_server.wire.validation import Condition, Limits

FORWARD, BACKWARD = "forward", "backward"
#: GenerateStream may yield this many times the per-request image limit.
STREAM_LIMIT_FACTOR = 64


@dataclass(frozen=True)
class GenerationPlan:
    """What one Generate request asks for, validated: the generator, latents and class condition of n images."""

    card: ModelCard
    latents: Tensor
    condition: Condition | None

    def inputs(self) -> list[Tensor]:
        """The batched inputs: (z, e) for a conditional generator, (z,) otherwise."""
        return [self.latents] if self.condition is None else [self.latents, self.condition.embeddings]

    def slice(self, start: int, stop: int) -> GenerationPlan:
        condition = self.condition
        if condition is not None:
            ids = condition.class_ids
            condition = Condition(condition.embeddings[start:stop], None if ids is None else ids[start:stop])
        return GenerationPlan(self.card, self.latents[start:stop], condition)


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, store: ModelStore, batchers: BatcherPool, limits: Limits, max_batch: int) -> None:
        self.store = store
        self.batchers = batchers
        self.limits = limits
        self.max_batch = max_batch

    def ListModels(
        self, request: generation_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> generation_pb2.ListModelsResponse:
        cards = self.store.registry.list()
        if not request.all_versions:
            newest = {card.name: card for card in cards}  # list() is sorted by name, then version
            cards = list(newest.values())
        cards = [
            card
            for card in cards
            if (not request.kind or convert.KIND_TO_PROTO[card.kind] == request.kind)
            and request.name_contains in card.name
        ]
        return generation_pb2.ListModelsResponse(models=[convert.card_proto(c, self._backends(c)) for c in cards])

    def GetModel(
        self, request: generation_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> generation_pb2.GetModelResponse:
        card = self.store.card(validation.model_ref(request.model))
        prior = self.store.latent_prior(card) if card.kind == "generator" else None
        return generation_pb2.GetModelResponse(card=convert.card_proto(card, self._backends(card), prior))

    def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        plan = self._plan(request, self.limits)
        return self._response(plan, self._forward(plan, context), request.format, 0, plan.latents.shape[0])

    def GenerateStream(
        self, request: generation_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[generation_pb2.GenerateResponse]:
        if request.chunk_size < 0:
            raise invalid_argument("chunk_size", f"must be 0 (server's choice) or positive, got {request.chunk_size}")
        stream_limits = Limits(self.limits.max_images * STREAM_LIMIT_FACTOR, self.limits.max_pixels)
        plan = self._plan(request, stream_limits)
        chunk = min(request.chunk_size or self.max_batch, self.limits.max_images)
        total = plan.latents.shape[0]
        for start in range(0, total, chunk):
            if not context.is_active():
                return  # the client went away: draw no more images
            part = plan.slice(start, min(start + chunk, total))
            yield self._response(part, self._forward(part, context), request.format, start, total)

    def Backward(
        self, request: generation_pb2.BackwardRequest, context: grpc.ServicerContext
    ) -> generation_pb2.BackwardResponse:
        card = self._generator(request.model)
        z = validation.latents(request.latents, "latents", card, self.limits)
        n = z.shape[0]
        condition = self._condition(request, card, n, seed=None)
        shape = (card.channels, card.resolution or 0, card.resolution or 0)
        grad = validation.exact_images(request.grad_images, "grad_images", shape, n)
        inputs = [z] if condition is None else [z, condition.embeddings]
        grads = self._batcher(card).call(BACKWARD, [*inputs, grad], context, grad=True)
        response = generation_pb2.BackwardResponse(
            grad_latents=convert.float_tensor(grads[0]), model=convert.ref_proto(card)
        )
        if condition is not None:
            response.grad_class_embeddings.CopyFrom(convert.float_tensor(grads[1]))
        return response

    # --- request -> plan ------------------------------------------------------------------------------------------

    def _generator(self, ref: common_pb2.ModelRef) -> ModelCard:
        card = self.store.card(validation.model_ref(ref))
        if card.kind != "generator":
            raise invalid_argument("model", f"{card.ref} is a {card.kind}, not a generator", "NOT_A_GENERATOR")
        return card

    def _plan(self, request: generation_pb2.GenerateRequest, limits: Limits) -> GenerationPlan:
        card = self._generator(request.model)
        source = request.WhichOneof("latent_source")
        if source == "latents":
            z = validation.latents(request.latents, "latents", card, limits)
            generator = sampling.seeded_generator(0)  # draws the classes when the condition is unset
        elif source == "seeded":
            count = validation.count(request.seeded.count, "seeded.count", limits)
            truncation = self._truncation(request)
            generator = sampling.seeded_generator(request.seeded.seed)
            prior = self.store.latent_prior(card)
            z = sampling.draw_latents(generator, count, card.latent_size or 0, prior, truncation)
        else:
            raise invalid_argument("latent_source", "set `latents` or `seeded`", "MISSING_LATENTS")
        return GenerationPlan(card, z, self._condition(request, card, z.shape[0], seed=generator))

    @staticmethod
    def _truncation(request: generation_pb2.GenerateRequest) -> float | None:
        if not request.HasField("truncation"):
            return None
        value = request.truncation
        if not value >= sampling.MIN_TRUNCATION or value == float("inf"):
            raise invalid_argument(
                "truncation", f"must be a finite number of at least {sampling.MIN_TRUNCATION}, got {value}"
            )
        return float(value)

    def _condition(
        self,
        request: generation_pb2.GenerateRequest | generation_pb2.BackwardRequest,
        card: ModelCard,
        n: int,
        seed: torch.Generator | None,
    ) -> Condition | None:
        """The request's class condition for n images; drawn from `seed` when unset (Generate), else required."""
        which = request.condition.WhichOneof("condition") if request.HasField("condition") else None
        if card.embedding_size is None:
            if which is not None:
                raise invalid_argument("condition", f"{card.ref} is unconditional; leave `condition` unset")
            return None
        if which == "embeddings":
            vectors = validation.embeddings(
                request.condition.embeddings, "condition.embeddings", n, card.embedding_size
            )
            return Condition(vectors, None)
        if which == "class_ids":
            ids = validation.class_ids(
                request.condition.class_ids.ids, "condition.class_ids.ids", n, self._classes(card)
            )
        elif seed is not None:
            ids = sampling.draw_classes(seed, n, self._classes(card))
        else:
            raise invalid_argument("condition", f"{card.ref} is class-conditional: give class ids or embeddings")
        return Condition(F.embedding(ids, self._embedding_table(card)), ids)

    @staticmethod
    def _classes(card: ModelCard) -> int:
        if not card.num_classes:
            raise invalid_argument("condition.class_ids", f"{card.ref} has no class list; send embeddings")
        return card.num_classes

    def _embedding_table(self, card: ModelCard) -> Tensor:
        table = ConditionalGenerator(self.store.torch_model(card), card).class_embeddings()
        if table is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{card.ref} has no class embedding table to look ids up in; send embeddings",
                "condition.class_ids",
            )
        return table

    # --- running --------------------------------------------------------------------------------------------------

    def _batcher(self, card: ModelCard) -> DynamicBatcher:
        return self.batchers.get(card.ref, lambda: self._runner(card))

    def _forward(self, plan: GenerationPlan, context: grpc.ServicerContext) -> Tensor:
        return self._batcher(plan.card).call(FORWARD, plan.inputs(), context)[0]

    def _runner(self, card: ModelCard) -> RunBatch:
        """The batch function of one generator: images in [-1, 1] (forward) or the VJP (backward)."""
        module = self.store.torch_model(card)
        forward = self.store.forward_model(card)

        def run(key: Hashable, inputs: Sequence[Tensor]) -> list[Tensor]:
            if key == FORWARD:
                return [model_to_wire(forward(*inputs), card)]
            leaves = [x.detach().requires_grad_(True) for x in inputs[:-1]]
            with torch.enable_grad():
                images = model_to_wire(module(*leaves), card)
                return list(torch.autograd.grad(images, leaves, grad_outputs=inputs[-1]))

        return run

    def _backends(self, card: ModelCard) -> list[str]:
        return ["onnx"] if card.onnx is not None or card.format == "onnx" else []

    @staticmethod
    def _response(
        plan: GenerationPlan, images: Tensor, image_format: int, offset: int, total: int
    ) -> generation_pb2.GenerateResponse:
        response = generation_pb2.GenerateResponse(
            images=convert.image_batch(images, as_png=image_format != common_pb2.IMAGE_FORMAT_TENSOR),
            latents=convert.float_tensor(plan.latents),
            model=convert.ref_proto(plan.card),
            offset=offset,
            total=total,
        )
        if plan.condition is not None:
            response.class_embeddings.CopyFrom(convert.float_tensor(plan.condition.embeddings))
            if plan.condition.class_ids is not None:
                response.class_ids.extend(plan.condition.class_ids.tolist())
        return response
